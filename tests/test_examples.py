"""The examples and the benchmark run end to end (tiny settings; the real runs are minutes)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flax_quickstart_runs_and_reports_every_method(tmp_path):
    output = tmp_path / "quickstart.png"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "flax_quickstart.py"),
            "--epochs",
            "3",
            "--samples",
            "8",
            "--seeds",
            "1",
            "--train-size",
            "100",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    for name in ("AdamW", "IVON@mean", "IVON BMA-8", "noisy test images"):
        assert name in result.stdout
    assert output.stat().st_size > 10_000


def test_bench_reports_state_memory(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_ivon

    rows = bench_ivon.bench_memory()["state_bytes_per_parameter_byte"]
    # a few scalars (step counts) on top of the per-parameter buffers
    assert rows["adamw"] == pytest.approx(2.0, abs=1e-3)
    assert rows["ivon, S = 1"] == pytest.approx(3.0, abs=1e-3)
    assert rows["ivon, S > 1 with sampled_value_and_grad"] == pytest.approx(3.0, abs=1e-3)
    assert rows["ivon, S > 1 with accumulate_gradients (accumulate=True)"] == pytest.approx(
        5.0, abs=1e-3
    )
