"""Orbax checkpoints of a train state plus the Grain data-iterator state; SIGTERM handling.

One step directory holds three items: ``state`` (every array of the train state:
parameters, optimiser state, step, RNG, non-finite-step count), ``data`` (the Grain
iterator position, via Grain's own Orbax handler) and ``meta`` (JSON: config,
counts). Restoring into a template state puts each array back on the template's
sharding, so a run resumes on the same mesh (or a different one) without a gather.
The template's array shapes are checked against the checkpoint's metadata first, so a
checkpoint of another model is one :class:`CheckpointMismatchError` line, not Orbax's
tracebacks from its restore threads.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grain

import jax
import orbax.checkpoint as ocp

from jdelta.errors import UserError

log = logging.getLogger(__name__)


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint whose arrays do not fit the state it is restored into (another model's shapes)."""


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Dotted key path -> shape of every array-like leaf (one naming for templates and Orbax metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves
            if hasattr(leaf, "shape")}


def shape_mismatches(saved: dict[str, tuple[int, ...]], template: dict[str, tuple[int, ...]]) -> list[str]:
    """Human-readable differences between two ``{key path: shape}`` maps (empty when they fit)."""
    out = [f"{k}: {saved[k]} in the checkpoint, {template[k]} now" for k in template
           if k in saved and saved[k] != template[k]]
    out += [f"{k}: not in the checkpoint" for k in template if k not in saved]
    out += [f"{k}: in the checkpoint only" for k in saved if k not in template]
    return out


def _abstract(tree: Any) -> Any:
    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


class Checkpointer:
    """``orbax.checkpoint.CheckpointManager`` over (train state, data iterator, JSON meta).

    Args:
      directory: where step directories go (created if missing).
      save_every: :meth:`save` writes only on multiples of this (unless ``force``).
      keep: how many recent checkpoints to keep (older ones are deleted).
      async_save: write in a background thread; call :meth:`wait` before reading.
    """

    def __init__(self, directory: str | Path, *, save_every: int = 100, keep: int = 3, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got {save_every}, {keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iter: grain.DatasetIterator | None = None,
        meta: dict[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` (any pytree of arrays) at ``step``; returns whether a save started."""
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            import grain  # imported here: the train step and benchmarks need no grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(
        self,
        template: Any,
        *,
        data_iter: grain.DatasetIterator | None = None,
        step: int | None = None,
    ) -> tuple[Any, dict[str, Any] | None]:
        """Restore into the structure, dtypes and shardings of ``template`` (latest step by default).

        ``data_iter`` (if given) is moved in place to the saved position. Returns
        ``(state, meta)``; ``meta`` is ``None`` when none was saved.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        saved = set(self.manager.item_metadata(step).keys())
        self.check_shapes(template, step)
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(_abstract(template))}
        if data_iter is not None:
            if "data" not in saved:
                raise ValueError(f"checkpoint {self.directory}/{step} has no data-iterator state to restore")
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        if "meta" in saved:
            items["meta"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], (out["meta"] if "meta" in saved else None)

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]] | None:
        """``{key path: shape}`` of the train state saved at ``step`` (None if its metadata is unreadable)."""
        from etils import epath

        try:
            md = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory / str(step) / "state"))
        except Exception as e:  # noqa: BLE001 (an older layout: let Orbax's restore decide)
            log.debug("no array metadata for step %d: %s", step, e)
            return None
        return _shapes(getattr(md, "tree", md))

    def check_shapes(self, template: Any, step: int) -> None:
        """Raise :class:`CheckpointMismatchError` (one line) unless ``template`` fits the arrays saved at ``step``."""
        saved = self.saved_shapes(step)
        if saved is None:
            return
        diffs = shape_mismatches(saved, _shapes(template))
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} holds another model's arrays ({len(diffs)} differ; "
                f"e.g. {'; '.join(diffs[:3])}); restore it into a model of the saved shapes or start a new run "
                "directory")

    def wait(self) -> None:
        """Block until any background save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionGuard:
    """Context manager: SIGTERM (TPU preemption, ``kill``) sets :attr:`triggered` instead of killing.

    The training loop checks the flag after each step, saves a checkpoint and
    returns cleanly. The previous handler is restored on exit. Outside the main
    thread (where Python cannot install handlers) it is a no-op.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.triggered = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):  # noqa: ARG002
        log.warning("received signal %d: will save a checkpoint and stop after this step", signum)
        self.triggered = True

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
