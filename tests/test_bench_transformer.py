"""bench/bench_transformer.py: both timed steps run, at a tiny size, and train the model."""

from __future__ import annotations

import jax
import numpy as np
from programs import load_script

bench = load_script("bench/bench_transformer.py", sibling_imports=True)


def test_adamw_and_ivon_steps_run_and_change_the_parameters():
    size = bench.Size(width=16, depth=1, heads=2, context=8, batch=2)
    runners, num_params = bench.build_runners(size, warmup=0)
    assert set(runners) == {"adamw", "ivon"} and num_params > 4000
    before = jax.tree.map(np.array, runners["adamw"].params)
    for runner in runners.values():
        jax.block_until_ready(runner.run(1))
        assert np.isfinite(float(runner.loss))
        changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), runner.params, before)
        assert all(jax.tree.leaves(changed))
    # the same model and batch: the first step's losses differ only by IVON's sample
    assert abs(float(runners["adamw"].loss) - float(runners["ivon"].loss)) < 0.05
    row = bench.format_table(
        {"tiny": {"num_params": num_params, "results": {"adamw": _row(), "ivon": _row()}}}
    )
    assert "tiny" in row and "1.00x" in row


def _row():
    return {"min_ms": 1.0, "median_ms": 1.0, "ratio_to_adamw": 1.0, "ratio_of_minima_to_adamw": 1.0}
