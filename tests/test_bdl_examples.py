"""The examples' harness (bdl_examples: the fit loop, checkpoints) and the benchmarks' timing
helper (bench/timing.py), against properties that a wrong implementation would break."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bdl_examples.checkpoints import (
    CheckpointError,
    atomic_open,
    load_checkpoint,
    load_meta,
    save_checkpoint,
)
from bdl_examples.models import MLP
from bdl_examples.training import cross_entropy, fit, fit_cross_entropy

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)  # the bench scripts import timing from their folder
import timing  # noqa: E402 (after the path)

# ----- bench/timing.py -------------------------------------------------------------------------


class FakeClock:
    """A clock that only the candidates move: each call of a candidate takes a known time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def spend(self, seconds):
        self.now += seconds


def test_alternate_takes_turns_and_reverses_the_order_every_other_repeat():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    seconds = timing.alternate(candidates, repeats=4)
    assert calls == list("abc" + "cba" + "abc" + "cba")  # turns, reversed every other repeat
    assert {name: len(s) for name, s in seconds.items()} == {"a": 4, "b": 4, "c": 4}


def test_alternate_gives_each_candidate_its_own_time_per_step():
    clock = FakeClock()
    durations = {"fast": iter([2.0, 4.0, 2.0]), "slow": iter([6.0, 3.0, 9.0])}
    candidates = {name: (lambda d=d: clock.spend(next(d))) for name, d in durations.items()}
    repeats_seen = []
    seconds = timing.alternate(
        candidates,
        repeats=3,
        steps=2,
        clock=clock,
        on_repeat=lambda repeat, so_far: repeats_seen.append((repeat, len(so_far["slow"]))),
    )
    assert seconds == {"fast": [1.0, 2.0, 1.0], "slow": [3.0, 1.5, 4.5]}
    assert repeats_seen == [(0, 1), (1, 2), (2, 3)]


def test_summarize_gives_min_median_and_ratios_within_repeats():
    fast, slow = [1.0, 2.0, 1.0, 4.0], [3.0, 1.5, 4.5, 8.0]
    summary = timing.summarize(slow, reference=fast)
    assert (summary["min"], summary["max"], summary["all"]) == (1.5, 8.0, slow)
    assert summary["median"] == pytest.approx(3.75)  # the mean of the middle two
    # per-repeat ratios 3, 0.75, 4.5, 2: median 2.5; ratio of the minima 1.5 / 1
    assert summary["median_of_ratios"] == pytest.approx(2.5)
    assert summary["ratio_of_minima"] == pytest.approx(1.5)
    assert "median_of_ratios" not in timing.summarize([2.0])
    with pytest.raises(ValueError, match="the reference has 2 repeats"):
        timing.summarize([1.0], reference=[1.0, 2.0])


def test_median_time_leaves_the_warm_up_calls_out():
    clock = FakeClock()
    durations = iter([50.0, 40.0, 3.0, 1.0, 2.0])  # compile, warm-up, then the timed calls
    median, times = timing.median_time(
        lambda: clock.spend(next(durations)), repeats=3, warmup=2, clock=clock
    )
    assert (median, times) == (2.0, [3.0, 1.0, 2.0])


def test_write_json_creates_the_folder_and_replaces_the_file(tmp_path):
    import json

    path = tmp_path / "results" / "run.json"
    timing.write_json(str(path), {"a": 1})
    timing.write_json(str(path), {"b": [1.5, 2.5]})
    assert json.loads(path.read_text()) == {"b": [1.5, 2.5]}
    assert path.read_text().endswith("\n") and os.listdir(path.parent) == ["run.json"]


# ----- bdl_examples.training -------------------------------------------------------------------


def test_fit_runs_every_epoch_without_replacement_and_drops_the_remainder():
    """10 examples in batches of 3: 3 steps per epoch, 9 distinct examples, 1 left out; every
    step has its own key; each input stays with its label."""
    x = np.arange(10, dtype=np.int32)
    y = 10 * x
    epochs = 4

    def step(state, key, batch):
        counts, bits, index = state
        xb, yb = batch
        counts = counts.at[index // 3].add(jax.nn.one_hot(xb, 10, dtype=jnp.int32).sum(0))
        bits = bits.at[index].set(jax.random.bits(key, dtype=jnp.uint32))
        aux = {"mismatched": jnp.sum(yb != 10 * xb), "batch": jnp.float32(xb.shape[0])}
        return (counts, bits, index + 1), aux

    state = (jnp.zeros((epochs, 10), jnp.int32), jnp.zeros(3 * epochs, jnp.uint32), 0)
    result = fit(
        step, state, x, y, epochs=epochs, batch_size=3, key=jax.random.key(0), verbose=False
    )
    counts, bits, steps = result.state
    assert len(result.history) == epochs and int(steps) == 3 * epochs
    assert all(h == {"mismatched": 0.0, "batch": 3.0} for h in result.history)
    counts = np.asarray(counts)
    assert np.all(counts.sum(1) == 9) and counts.max() == 1  # per epoch: 9 distinct examples
    assert len({tuple(row) for row in counts}) > 1  # reshuffled: not the same one left out
    assert len(set(np.asarray(bits).tolist())) == 3 * epochs  # a fresh key at every step
    assert result.seconds > 0


def test_fit_cross_entropy_takes_the_gradient_at_the_sample_and_updates_the_parameters():
    """With a hook that returns zeros, one full-batch SGD step moves the parameters by the
    gradient at zero; the hook receives the key, the parameters and the optimizer's state."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = rng.integers(0, 2, 8).astype(np.int32)
    model = MLP(widths=(), num_outputs=2)
    params = model.init(jax.random.key(0), x[:1])["params"]
    optimizer = optax.sgd(0.5, momentum=0.9)
    structure = jax.tree.structure(optimizer.init(params))
    received = []

    def sample(key, params, opt_state):
        received.append((key.dtype, jax.tree.structure(opt_state)))
        return jax.tree.map(jnp.zeros_like, params), opt_state

    result = fit_cross_entropy(
        model,
        params,
        optimizer,
        x,
        y,
        epochs=1,
        batch_size=8,
        key=jax.random.key(1),
        sample=sample,
        verbose=False,
    )
    new_params, opt_state = result.state
    assert received == [(jax.random.key(0).dtype, structure)]  # traced once, with the state
    zeros = jax.tree.map(jnp.zeros_like, params)
    gradient = jax.grad(cross_entropy, argnums=1)(model, zeros, x, y)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, params, gradient)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new_params, expected)  # fmt: skip
    assert jax.tree.structure(opt_state) == structure
    assert result.history[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)  # at zero: uniform


# ----- bdl_examples.checkpoints ----------------------------------------------------------------


def _state():
    return {
        "params": {"w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(3)},
        "step": np.int32(7),
        "flags": np.array([True, False]),
        "moments": (np.linspace(0, 1, 4), np.float64(2.5)),
    }


def test_checkpoint_round_trip_is_exact(tmp_path):
    path = str(tmp_path / "checkpoint.npz")
    state, meta = _state(), {"epoch": 3, "log": [{"loss": 0.25}], "name": "run"}
    save_checkpoint(path, state, meta)
    restored, restored_meta = load_checkpoint(path, state)
    assert restored_meta == meta and load_meta(path) == meta
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        want = np.asarray(want)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # no temporary file left


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: {**s, "extra": np.zeros(1)}, "was saved for another model or optimizer"),
        (lambda s: {**s, "step": np.zeros(2, np.int32)}, r"int32\[\] where the run has int32\[2\]"),
        (lambda s: {**s, "step": np.float32(7)}, r"int32\[\] where the run has float32\[\]"),
    ],
    ids=["structure", "shape", "dtype"],
)
def test_a_mismatched_template_is_refused_naming_the_file(tmp_path, change, message):
    path = str(tmp_path / "checkpoint.npz")
    save_checkpoint(path, _state(), {"epoch": 1})
    with pytest.raises(CheckpointError, match=message) as raised:
        load_checkpoint(path, change(_state()))
    assert path in str(raised.value)


def test_a_missing_or_damaged_checkpoint_is_named(tmp_path):
    missing = str(tmp_path / "missing.npz")
    for read in (lambda p: load_checkpoint(p, _state()), load_meta):
        with pytest.raises(CheckpointError, match="no checkpoint at") as raised:
            read(missing)
        assert missing in str(raised.value)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="cannot read") as raised:
        load_checkpoint(str(damaged), _state())
    assert str(damaged) in str(raised.value)


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = str(tmp_path / "checkpoint.npz")
    save_checkpoint(path, _state(), {"epoch": 1})
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write(b"half a checkpoint")
        raise RuntimeError("crash while writing")
    assert load_meta(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.npz"]
