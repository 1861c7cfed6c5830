"""One process of a multi-process test run (started by multihost_harness).

``cli JSON_ARGV``: ``jdelta.cli.main(argv)``, exit with its code.
``distill JSON_CONFIG [SLEEP_S]``: ``jdelta.stages.distill.train`` of the config mapping (the CLI's
start: distributed initialise + program check), each step slowed by ``SLEEP_S`` seconds (so a
signal sent mid-training lands mid-training), then the summary and the final parameters
(``params.npz``, process 0) into the run directory.
"""

import json
import os
import sys

import jax

jax.config.update("jax_default_matmul_precision", os.environ.get("JAX_DEFAULT_MATMUL_PRECISION", "highest"))


def main() -> int:
    mode = sys.argv[1]
    if mode == "cli":
        from jdelta.cli import main as cli_main

        return cli_main(json.loads(sys.argv[2]))
    if mode == "distill":
        import time

        import numpy as np

        from jdelta import distributed
        from jdelta.config import build, to_dict
        from jdelta.distill import loop
        from jdelta.stages.distill import Config, train

        cfg = build(Config, json.loads(sys.argv[2]))
        sleep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
        distributed.initialize_from_env()
        distributed.check_same_program(to_dict(cfg), stage="distill")
        if sleep:
            run_loop = loop.run_loop

            def slow_loop(state, train_step, produce, **kw):
                def slow(state, step):
                    time.sleep(sleep)
                    return produce(state, step)
                return run_loop(state, train_step, slow, **kw)

            import jdelta.distill.loop as loop_module
            loop_module.run_loop = slow_loop
        result = train(cfg)
        leaves = [distributed.host_array(x) for x in jax.tree.leaves(result.state.params)]
        if distributed.is_primary():
            np.savez(os.path.join(cfg.run_dir, "params.npz"), *leaves)
        print("SUMMARY " + json.dumps({k: v for k, v in result.summary.items() if k != "last"}
                                      | {"loss": result.summary["last"].get("loss")}, default=str), flush=True)
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main())
