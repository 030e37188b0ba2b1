"""The example programs and the benchmarks run end to end (tiny settings; the real runs are
minutes). The programs are called in-process through their ``main(argv)``: each test pays
for its own compilations only, not for a fresh interpreter's imports."""

import sys

import numpy as np
import pytest
from programs import load_script

# The example programs, end to end: slow as a whole (skipped by `-m "not slow"`).
pytestmark = pytest.mark.slow


def _example(name: str):
    return load_script(f"examples/{name}.py")


# ----- examples/flax_quickstart.py (make demo) -----------------------------------------------


def test_flax_quickstart_runs_and_reports_every_method(tmp_path, capsys):
    quickstart = _example("flax_quickstart")
    output = tmp_path / "quickstart.png"
    argv = ["--epochs", "2", "--samples", "8", "--seeds", "1", "--train-size", "100"]
    means = quickstart.main([*argv, "--hidden", "16", "--output", str(output)])
    printed = capsys.readouterr().out
    for name in ("AdamW", "IVON@mean", "IVON BMA-8", "noisy test images"):
        assert name in printed
    assert set(means) == {"test", "noisy test"}
    for by_method in means.values():
        assert set(by_method) == {"AdamW", "IVON@mean", "IVON BMA-8"}
        for row in by_method.values():
            assert 0 <= row["accuracy"] <= 1 and np.isfinite(row["nll"]) and row["ece"] >= 0
    assert output.stat().st_size > 10_000


def test_flax_quickstart_rejects_a_sample_count_the_bma_cannot_batch(capsys):
    quickstart = _example("flax_quickstart")
    with pytest.raises(SystemExit) as raised:
        quickstart.parse_args(["--samples", "12"])
    assert raised.value.code == 2 and "multiple of 8" in capsys.readouterr().err


# ----- bench/ ----------------------------------------------------------------------------------


def test_bench_reports_state_memory():
    bench_ivon = load_script("bench/bench_ivon.py", sibling_imports=True)
    rows = bench_ivon.bench_memory()["state_bytes_per_parameter_byte"]
    # a few scalars (step counts) on top of the per-parameter buffers
    assert rows["adamw"] == pytest.approx(2.0, abs=1e-3)
    assert rows["ivon, S = 1"] == pytest.approx(3.0, abs=1e-3)
    assert rows["ivon, S > 1 with sampled_value_and_grad"] == pytest.approx(3.0, abs=1e-3)
    assert rows["ivon, S > 1 with accumulate_gradients (accumulate=True)"] == pytest.approx(
        5.0, abs=1e-3
    )


def test_bench_forms_the_generators_jtj_exactly():
    """bench_implicit_vi's solver-error part diagonalises J^T J built column by column from the
    library's matrix-free product: it must equal J^T J of the generated means' Jacobian."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import implicit_vi as ivi

    bench = load_script("bench/bench_implicit_vi.py", sibling_imports=True)
    network = nn.Dense(3)
    params = network.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    generator = ivi.MMGenerator((3, 3), (4, 4), 1, (6, 5))
    bnn = ivi.ImplicitBNN.from_linen(network, params, generator=generator)
    vi_params = bnn.init(jax.random.key(1))
    z = jax.random.normal(jax.random.key(2), (1, bnn.latent_dim))
    jtj = bench.explicit_jtj(bnn, vi_params.generator, z, chunk=4)  # chunks of 4, 4 and 1
    jacobian = jax.jit(  # one compilation instead of one per operation
        jax.jacfwd(lambda u: ivi.generator_mean(bnn.model, vi_params.generator, u[None])[0])
    )
    j = np.asarray(jacobian(z[0]), np.float64)
    assert j.shape == (15, 9)
    np.testing.assert_allclose(jtj, j.T @ j, rtol=1e-4, atol=1e-7 * np.abs(j.T @ j).max())


# ----- examples/implicit_vi_digits.py: the quick start against MAP ----------------------------


def test_digits_example_runs_with_one_kl_weight(tmp_path, capsys):
    digits = _example("implicit_vi_digits")
    output = tmp_path / "digits.png"
    argv = ["--epochs", "1", "--kl-weight", "0.1", "--test-samples", "4"]
    result = digits.main([*argv, "--output", str(output)])
    printed = capsys.readouterr().out
    assert "one training" in printed and "KL weight 0.1" in printed
    assert result["kl_weight"] == 0.1 and result["table"] == ()
    for name in ("MLP, Adam (MAP)", "implicit VI, BMA K=4"):
        row = result[name]
        assert 0 <= row["accuracy"] <= 1 and np.isfinite(row["nll"]) and row["ece"] >= 0
    assert output.stat().st_size > 10_000


def test_digits_example_arguments(capsys):
    digits = _example("implicit_vi_digits")
    import implicit_vi as ivi

    assert digits.parse_args([]).kl_weights == ivi.KL_WEIGHTS
    assert digits.parse_args(["--kl-weights", "0.1,0.01"]).kl_weights == (0.1, 0.01)
    assert digits.parse_args(["--kl-weight", "0.3"]).kl_weights == (0.3,)
    assert digits.parse_args(["--kl-weights", "0,1"]).kl_weights == (0.0, 1.0)  # the library's
    for argv in (
        ["--kl-weight", "0.1,0.2"],
        ["--kl-weights", "-0.1,1"],
        ["--kl-weight", "0.1", "--kl-weights", "1"],
    ):
        with pytest.raises(SystemExit) as raised:
            digits.parse_args(argv)
        assert raised.value.code == 2 and "--kl-weight" in capsys.readouterr().err


# ----- examples/implicit_vi_regression.py: in-between uncertainty against NUTS ---------------


def test_regression_band_summary_and_gap_ratio_on_a_hand_case():
    example = _example("implicit_vi_regression")
    grid = np.linspace(-1.5, 1.5, 301)[:, None]
    scale = 1.0 + grid.ravel() ** 2
    # Two networks, f = +-scale(x): mean 0 and (population) std exactly scale(x).
    samples = np.stack([scale, -scale])[..., None]
    summary = example.band_summary(grid, samples)
    # grid point i is x = -1.5 + 0.01 i: the gap |x| <= 0.3 is i = 120..180, the data
    # 0.5 <= |x| <= 0.9 are i = 60..100 and 200..240 (bounds included)
    gap = np.arange(120, 181)
    data = np.r_[60:101, 200:241]
    np.testing.assert_allclose(summary["mean"], 0.0, atol=1e-15)
    np.testing.assert_allclose(summary["std"], scale, rtol=1e-12)
    assert summary["gap_std"] == pytest.approx(scale[gap].mean(), rel=1e-12)
    assert summary["data_std"] == pytest.approx(scale[data].mean(), rel=1e-12)
    reference = example.band_summary(grid, 2 * samples)["gap_std"]
    assert example.gap_ratio(summary["gap_std"], reference) == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(ValueError, match="reference_gap_std must be > 0"):
        example.gap_ratio(0.3, 0.0)
    with pytest.raises(ValueError, match="no grid point"):
        example.region_mean(np.array([2.0]), np.array([1.0]), (0.0, 0.3))


def test_regression_metrics_against_the_gaussian_density():
    example = _example("implicit_vi_regression")
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(50, 7, 1))
    targets = rng.normal(size=(7, 1))
    mean, variance = samples.mean(0).ravel(), samples.var(0).ravel() + example.NOISE_STD**2
    density = np.exp(-0.5 * (targets.ravel() - mean) ** 2 / variance) / np.sqrt(
        2 * np.pi * variance
    )
    result = example.regression_metrics(samples, targets)
    assert result["nll"] == pytest.approx(-np.log(density).mean(), rel=1e-12)
    assert result["rmse"] == pytest.approx(np.sqrt(np.mean((mean - targets.ravel()) ** 2)))


def test_regression_example_rejects_bad_arguments(capsys):
    example = _example("implicit_vi_regression")
    for argv, name in (
        (["--steps", "0"], "--steps"),
        (["--train-size", "1"], "--train-size"),
        (["--weight-noise", "0"], "--weight-noise"),
        (["--weight-noise", "fixed"], "--weight-noise"),
    ):
        with pytest.raises(SystemExit) as raised:
            example.parse_args(argv)
        assert raised.value.code == 2
        assert name in capsys.readouterr().err
    assert example.parse_args([]).weight_noise == "learned"
    assert example.parse_args(["--weight-noise", "1e-3"]).weight_noise == 1e-3


def test_regression_implicit_vi_is_the_library_default_or_the_fixed_noise():
    """--weight-noise learned: the library's defaults, whose per-leaf prior (the template's
    initial stds) IVON and NUTS share; a number: that fixed noise and the prior N(0, 1)."""
    import jax

    example = _example("implicit_vi_regression")
    module = example.make_network(4)
    x = np.zeros((3, 1), np.float32)
    learned = example.make_implicit_bnn(module, x)
    assert learned.model.learn_weight_noise
    template = module.init(jax.random.key(0), x[:1])["params"]
    priors = example.prior_std_tree(learned)
    assert jax.tree.structure(priors) == jax.tree.structure(template)
    kernel = np.asarray(template["Dense_1"]["kernel"])
    assert priors["Dense_1"]["kernel"] == pytest.approx(kernel.std(), rel=1e-5)
    assert priors["Dense_1"]["bias"] == priors["Dense_1"]["kernel"]  # a zero bias: its kernel's
    fixed = example.make_implicit_bnn(module, x, 1e-3)
    assert not fixed.model.learn_weight_noise
    assert set(fixed.model.weight_noise) == {1e-3} and set(fixed.model.prior_std) == {1.0}


def test_regression_example_runs_without_blackjax_with_a_fixed_weight_noise(tmp_path, monkeypatch):
    """One run of the whole program (the implicit-VI model is the costly part: it is built
    once), without blackjax, with --weight-noise 0.01: the flag reaches the implicit-VI run,
    which returns 500 finite draws at every grid and test input."""
    # None in sys.modules makes `import blackjax` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "blackjax", None)
    example = _example("implicit_vi_regression")
    implicit_runs = []

    def run_implicit_vi(bnn, *args, **kwargs):
        draws = original(bnn, *args, **kwargs)
        implicit_runs.append((bnn, draws))
        return draws

    original = example.run_implicit_vi
    monkeypatch.setattr(example, "run_implicit_vi", run_implicit_vi)
    lines = []
    output = tmp_path / "regression.png"
    argv = ["--steps", "5", "--ivon-steps", "5", "--seeds", "1", "--samples", "2"]
    argv += ["--train-size", "20", "--nuts-samples", "5", "--weight-noise", "0.01"]
    result = example.main([*argv, "--output", str(output)], log=lines.append)
    text = "\n".join(lines)
    assert "NUTS reference skipped" in text and "pip install -e .[nuts]" in text
    assert "weight noise fixed 0.01" in text
    assert set(result["results"]) == {"implicit VI", "IVON"} and result["nuts"] is None
    for row in result["results"].values():
        assert len(row["gap_std"]) == 1 and row["gap_ratio"] is None
        assert all(np.isfinite(row["rmse"])) and all(s > 0 for s in row["gap_std"])
    ((bnn, draws),) = implicit_runs
    assert not bnn.model.learn_weight_noise and set(bnn.model.weight_noise) == {0.01}
    assert draws.shape == (500, len(example.GRID) + 200, 1) and np.all(np.isfinite(draws))
    assert output.stat().st_size > 10_000


def test_regression_nuts_matches_bayesian_linear_regression():
    # A linear "network" has a Gaussian posterior in closed form; NUTS, given the example's
    # log density (likelihood + a prior std per leaf), must reproduce its predictive std.
    blackjax = pytest.importorskip("blackjax")
    import flax.linen as nn

    example = _example("implicit_vi_regression")
    rng = np.random.default_rng(1)
    x, y = example.make_data(rng, 20)
    grid = np.array([[-1.0], [0.0], [1.5]], np.float32)
    prior_std = {"kernel": 2.0, "bias": 0.5}  # one per leaf, as implicit VI's default prior
    outputs, info = example.run_nuts(
        blackjax,
        nn.Dense(1),
        (x, y),
        grid,
        prior_std=prior_std,
        chains=2,
        warmup=200,
        samples=500,
        seed=0,
        log=lambda _: None,
    )
    features = np.concatenate([x, np.ones_like(x)], 1).astype(np.float64)
    prior_precision = np.diag([1 / prior_std["kernel"] ** 2, 1 / prior_std["bias"] ** 2])
    precision = prior_precision + features.T @ features / example.NOISE_STD**2
    covariance = np.linalg.inv(precision)
    grid_features = np.concatenate([grid, np.ones_like(grid)], 1)
    exact_std = np.sqrt(np.einsum("gi,ij,gj->g", grid_features, covariance, grid_features))
    nuts_std = outputs.reshape(-1, 3).std(0)
    np.testing.assert_allclose(nuts_std, exact_std, rtol=0.15)
    assert info["divergent"] == 0
    diagnostics = example.chain_diagnostics(blackjax, outputs, np.zeros((3, 1)))
    assert diagnostics["max_rhat"] < 1.05 and len(diagnostics["per_chain_gap_std"]) == 2


# ----- examples/implicit_vi_defaults_study.py: the sweep behind the documented defaults ------


def test_defaults_study_runs_a_calibrated_variant_on_a_generated_task(tmp_path):
    study = _example("implicit_vi_defaults_study")
    output = tmp_path / "study.json"
    # The library's defaults at a fixed KL weight: the posterior the quick start chooses from.
    assert study.VARIANTS["kl_weight=0.1"] == ("implicit", {"kl_weight": 0.1})
    summary = study.main(
        [
            "--variants", "kl_weight=0.1", "--task", "spiral", "--validation-fraction", "0.15",
            "--epochs", "1", "--hidden", "8", "--seeds", "1", "--test-samples", "2",
            "--output", str(output),
        ]
    )  # fmt: skip
    row = summary["kl_weight=0.1"]
    assert "rotated" not in row  # rotations are for the digits only
    assert 0 < row["test"]["accuracy"]["mean"] <= 1 and row["train"]["relative_spread"]["mean"] > 0
    assert output.exists()
