"""On-policy resume is exact: 2 steps, stop, resume for 2 more == 4 uninterrupted steps.

Through the real stage (``jdelta.stages.distill.train``: checkpoint, data-iterator state, rollouts,
teacher scoring, update) on tiny models, for every mode and data source. Parameters and optimiser
state must match bitwise, and the resumed run's metrics rows must equal the uninterrupted run's
with no step logged twice. (va_opd, synthetic) -- the demo config, where the synthetic prompt
stream used to restart from its first batch on resume -- runs in the default suite; the other
mode x source pairs are marked slow.
"""

import contextlib

import jax
import numpy as np
import pytest
from distill_pair import records_setup, stage_config

from jdelta.distill.metrics import read_metrics
from jdelta.stages.distill import train

SLOW = pytest.mark.slow
CASES = [
    pytest.param("va_opd", "synthetic", id="va_opd-synthetic"),
    pytest.param("reverse_kl", "synthetic", id="reverse_kl-synthetic", marks=SLOW),
    pytest.param("gkd", "synthetic", id="gkd-synthetic", marks=SLOW),
    pytest.param("va_opd", "records", id="va_opd-records", marks=SLOW),
    pytest.param("reverse_kl", "records", id="reverse_kl-records", marks=SLOW),
    pytest.param("gkd", "records", id="gkd-records", marks=SLOW),
]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return records_setup(tmp_path_factory.mktemp("records"))


@contextlib.contextmanager
def compile_requests():
    """Counts the XLA compilations requested inside the block (``total``) and how many of them the
    persistent compilation cache answered (``hits``)."""
    counts = {"total": 0, "hits": 0}
    names = {"/jax/compilation_cache/compile_requests_use_cache": "total", "/jax/compilation_cache/cache_hits": "hits"}

    def listen(event, **kwargs):
        if event in names:
            counts[names[event]] += 1

    jax.monitoring.register_event_listener(listen)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_listener(listen)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state, state.rng, state.step,
                                                    state.nan_steps))]


@pytest.mark.parametrize(("mode", "source"), CASES)
def test_resume_equals_uninterrupted(mode, source, request, tmp_path):
    sections = request.getfixturevalue("records") if source == "records" else {}
    # gkd: half the steps train on teacher samples (the off-policy coin and the teacher sampler resume too)
    distill = {**sections.get("distill", {}), "mode": mode,
               **({"gkd_lambda": 0.5, "off_policy_source": "teacher"} if mode == "gkd" else {})}
    common = {**sections, "distill": distill, "optimizer": {"total_steps": 4}}
    straight = train(stage_config(tmp_path / "straight", train={"steps": 4}, **common))
    first = train(stage_config(tmp_path / "resumed", train={"steps": 2}, **common))
    with compile_requests() as requests:
        resumed = train(stage_config(tmp_path / "resumed", train={"steps": 4}, **common))
    # the restored state lowers to the programs the fresh one did: every compilation of the resumed run
    # is found in the tests' persistent compilation cache (tests/conftest.py)
    assert requests["total"] > 0 and requests["hits"] == requests["total"], requests
    assert (first.summary["steps_run"], resumed.summary["steps_run"], resumed.summary["steps"]) == (2, 2, 4)
    for a, b in zip(_leaves(resumed.state), _leaves(straight.state), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    ref = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    if mode == "gkd":
        assert {r["rollout/off_policy"] for r in ref} == {0.0, 1.0}, "both kinds of step were exercised"


def test_synthetic_stream_position_is_checkpointed():
    """The synthetic source's state is its position: a fresh iterator set to it continues the stream."""
    from distill_pair import STUDENT_CFG

    from jdelta.distill.synthetic import SyntheticPromptIterator, random_prompts

    it = SyntheticPromptIterator(STUDENT_CFG, batch=2, seed=5)
    for _ in range(3):
        next(it)
    state = it.get_state()
    assert state == {"batches_drawn": 3}
    again = SyntheticPromptIterator(STUDENT_CFG, batch=2, seed=5)
    again.set_state(state)
    expected = random_prompts(STUDENT_CFG, batch=2, seed=5)
    for _ in range(3):
        next(expected)
    for _ in range(2):
        a, b, c = next(again), next(it), next(expected)
        for key in c:
            np.testing.assert_array_equal(a[key], c[key])
            np.testing.assert_array_equal(b[key], c[key])
    assert again.get_state() == {"batches_drawn": 5}
