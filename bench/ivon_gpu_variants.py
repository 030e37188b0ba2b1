"""Where IVON's extra time in the ResNet-18 training step goes: variants of IVON timed side by
side with SGD in one run (bench_cifar's step: BatchNorm ResNet-18, batch 200, augmentation).

Variants (each a change of how ``ivon.py`` is traced, patched in for that build only):
  sgd              SGD with momentum (the reference)
  ivon             IVON as it is
  ivon_gradsq      hess_approx="gradsq": no noise kept in the state (noise still drawn)
  ivon_zeros       noise replaced by zeros (no random numbers drawn at all)
  ivon_nosample    gradient at the mean, sample_parameters skipped (the update alone)
  ivon_flat        one jax.random.normal of all the leaves' sizes, sliced per leaf
  ivon_split       one jax.random.split into a key per leaf (no fold_in), a draw per leaf
  ivon_boxmuller   per-leaf Box-Muller (ivon.py's CPU generator) on this backend
  ivon_gbarrier    the gradients materialised (optimization_barrier) before the update
  ivon_sbarrier    the sample and the state materialised after sample_parameters
  ivon_barriers    both
  ivon_baseline    --baseline: another ivon.py (e.g. the previous version)

Also counts the kernels of each compiled step (fusions, custom calls, ... outside fused
computations of the optimised HLO). Minimum and median ms per step over --repeats repeats of
--steps steps; the variants take turns, in an order that reverses between repeats
(bench/timing.py).

Usage:
  python bench/ivon_gpu_variants.py --repeats 7 --steps 20 --out /tmp/variants.json
  python bench/ivon_gpu_variants.py --model cnn --batchsize 32 --repeats 2 --steps 2  # CPU check
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import os
import re

import bench_cifar
import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing
from bdl_examples.models import CIFAR_MODELS, make_cifar_model

import ivon

# The CIFAR training program's module (examples/resnet_cifar/cifar_training.py), as
# bench_cifar imports it: the variants patch the step it builds.
ct = bench_cifar.ct


def _flat_draw(key, params, state, split_keys=False):
    """One standard-normal draw for all covered leaves, split in leaf order (or, with
    ``split_keys``, one ``jax.random.split`` for all leaves and a draw per leaf)."""
    dtype = state.ess.dtype
    sigma = ivon._posterior_std(state.hessian, state.ess, state.weight_decay)
    sigma_leaves, tree_def = jax.tree.flatten(sigma, is_leaf=ivon._is_masked)
    param_leaves = tree_def.flatten_up_to(params)
    total = sum(int(np.prod(s.shape)) for s in sigma_leaves if not ivon._is_masked(s))
    if split_keys:
        keys = jax.random.split(key, len(sigma_leaves))
    else:
        eps = jax.random.normal(key, (total,), dtype)
    samples, noises, offset = [], [], 0
    for i, (param, std) in enumerate(zip(param_leaves, sigma_leaves)):
        if ivon._is_masked(std):
            samples.append(param)
            noises.append(std)
            continue
        size = int(np.prod(std.shape))
        if split_keys:
            noise = std * jax.random.normal(keys[i], std.shape, dtype)
        else:
            noise = std * eps[offset : offset + size].reshape(std.shape)
        offset += size
        samples.append((param.astype(dtype) + noise).astype(param.dtype))
        noises.append(noise)
    return tree_def.unflatten(samples), tree_def.unflatten(noises)


@contextlib.contextmanager
def patched(module, **replacements):
    originals = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(module, name, value)


def variant_context(name, baseline):
    if name == "ivon_zeros":
        return patched(
            ivon, _standard_normal=lambda key, stream, shape, dtype: jnp.zeros(shape, dtype)
        )
    if name == "ivon_nosample":
        return patched(
            ivon, sample_parameters=lambda key, params, opt_state, **kw: (params, opt_state)
        )
    if name == "ivon_flat":
        return patched(ivon, _draw=_flat_draw)
    if name == "ivon_split":
        return patched(ivon, _draw=lambda k, p, s: _flat_draw(k, p, s, split_keys=True))
    if name == "ivon_boxmuller":
        return patched(
            ivon,
            _standard_normal=lambda key, stream, shape, dtype: ivon._box_muller_normal(
                key, stream, shape
            ),
        )
    if name == "ivon_baseline":
        return patched(ct, ivon=baseline)
    if name in ("ivon_sbarrier", "ivon_barriers"):
        original = ivon.sample_parameters

        def sample_then_barrier(key, params, opt_state, **kw):
            return jax.lax.optimization_barrier(original(key, params, opt_state, **kw))

        return patched(ivon, sample_parameters=sample_then_barrier)
    return contextlib.nullcontext()


def _barrier():
    """Materialises the gradients before IVON's update (no fusion across it)."""
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.lax.optimization_barrier(updates), state),
    )


def kernel_counts(hlo_text: str) -> dict:
    """Opcode counts outside fused computations of an optimised HLO module."""
    fused = set(re.findall(r"calls=%?([\w.\-]+)", hlo_text))
    counts = collections.Counter()
    name = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            name = header.group(1)
            continue
        if name is None or name in fused or "fused" in name:
            continue
        m = re.search(r"=\s+(?:\([^=]*\)|[^\s]+)\s+([a-z][a-z\-]*)\(", line)
        if m:
            counts[m.group(1)] += 1
    skip = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
    counts = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    counts["_kernels"] = sum(v for k, v in counts.items() if k not in skip)
    return counts


def build(name, model, batch, steps, mesh, baseline):
    """bench_cifar's compiled step for variant ``name`` (traced with the variant patched in)
    and the optimised HLO of that step."""
    optim = "sgd" if name == "sgd" else "ivon"
    num_train = batch * steps
    with variant_context(name, baseline):
        optimizer = None
        if name in ("ivon_gradsq", "ivon_gbarrier", "ivon_barriers"):
            optimizer = ct.ivon.ivon(
                ct.learning_rate_schedule(0.1, 1, 1000),
                ess=num_train,
                hess_init=0.5,
                beta1=0.9,
                beta2=0.99999,
                weight_decay=25.0 / num_train,
                hess_approx="gradsq" if name == "ivon_gradsq" else "price",
            )
            if name != "ivon_gradsq":
                optimizer = optax.chain(_barrier(), optimizer)
        case = bench_cifar.build(optim, model, batch, steps, mesh, optimizer=optimizer)
    case["hlo"] = case["step"].as_text()
    return case


def profile(cases, names, steps, directory):
    """GPU kernel time per step of each named variant, from a jax.profiler trace."""
    import glob

    from jax.profiler import ProfileData

    result = {}
    for name in names:
        case = cases[name]
        path = os.path.join(directory, name)
        with jax.profiler.trace(path):
            bench_cifar.time_steps(case, steps)
        files = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
        data = ProfileData.from_file(files[0])
        lines = {}
        for plane in data.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                totals = collections.Counter()
                counts = collections.Counter()
                for event in line.events:
                    totals[event.name] += event.duration_ns
                    counts[event.name] += 1
                if not totals:
                    continue
                lines[f"{plane.name} {line.name}"] = {
                    "total_us_per_step": sum(totals.values()) / 1e3 / steps,
                    "events_per_step": sum(counts.values()) / steps,
                    "top": [
                        [k, round(v / 1e3 / steps, 2), counts[k] / steps]
                        for k, v in totals.most_common(40)
                    ],
                }
        result[name] = lines
        print(f"\nprofile {name}:")
        for line_name, line in lines.items():
            print(
                f"  {line_name}: {line['total_us_per_step']:.0f} us/step, "
                f"{line['events_per_step']:.0f} events/step"
            )
            for k, us, n in line["top"][:12]:
                print(f"      {us:8.1f} us  x{n:<5g} {k[:90]}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=sorted(CIFAR_MODELS))
    parser.add_argument("--batchsize", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[
            "sgd",
            "ivon",
            "ivon_gradsq",
            "ivon_zeros",
            "ivon_nosample",
            "ivon_flat",
            "ivon_split",
        ],
    )
    parser.add_argument("--baseline", default=None, help="another ivon.py, as ivon_baseline")
    parser.add_argument("--out", default="ivon_gpu_variants.json")
    parser.add_argument("--hlo-dir", default=None, help="write gzipped HLO of some variants")
    parser.add_argument("--profile", nargs="*", default=[], help="variants to trace")
    parser.add_argument("--profile-dir", default="/tmp/ivon_profile")
    args = parser.parse_args(argv)

    baseline = None
    variants = list(args.variants)
    if args.baseline:
        import importlib.util

        spec = importlib.util.spec_from_file_location("ivon_baseline", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        variants.append("ivon_baseline")

    mesh = ct.make_mesh()
    model = make_cifar_model(args.model, num_classes=10)
    cases = {}
    for name in variants:
        cases[name] = build(name, model, args.batchsize, args.steps, mesh, baseline)
        counts = kernel_counts(cases[name]["hlo"])
        cases[name]["counts"] = counts
        print(
            f"{name}: compiled in {cases[name]['compile_seconds']:.1f} s, "
            f"{counts['_kernels']} kernel ops: "
            + ", ".join(f"{k} {v}" for k, v in list(counts.items())[:8]),
            flush=True,
        )
        if args.hlo_dir and name in args.profile:
            os.makedirs(args.hlo_dir, exist_ok=True)
            with gzip.open(os.path.join(args.hlo_dir, f"{name}.hlo.txt.gz"), "wt") as f:
                f.write(cases[name]["hlo"])
        del cases[name]["hlo"]

    seconds = timing.alternate(
        {
            name: (lambda case=cases[name]: bench_cifar.time_steps(case, args.steps))
            for name in variants
        },
        args.repeats,
        steps=args.steps,
    )
    report = {
        **timing.machine(),
        "model": args.model,
        "batch": args.batchsize,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "variants": {},
    }
    print(f"\n{args.model}, batch {args.batchsize}, {report['device_kind']}, jax {jax.__version__}")
    print(
        f"{'variant':<16} {'min ms':>8} {'median ms':>10} {'min/sgd':>8} {'med ratio':>10}"
        f" {'kernels':>8}"
    )
    for name in variants:
        summary = timing.summarize(seconds[name], reference=seconds[variants[0]])
        row = {
            "seconds_per_step": summary["all"],
            "min_ms": 1e3 * summary["min"],
            "median_ms": 1e3 * summary["median"],
            "ratio_of_minima": summary["ratio_of_minima"],
            "median_of_ratios": summary["median_of_ratios"],
            "compile_seconds": cases[name]["compile_seconds"],
            "hlo_op_counts": cases[name]["counts"],
        }
        report["variants"][name] = row
        print(
            f"{name:<16} {row['min_ms']:>8.2f} {row['median_ms']:>10.2f} "
            f"{row['ratio_of_minima']:>7.3f}x {row['median_of_ratios']:>9.3f}x "
            f"{row['hlo_op_counts']['_kernels']:>8}"
        )
    if args.profile:
        report["profile"] = profile(cases, args.profile, args.steps, args.profile_dir)
    print(f"wrote {timing.write_json(args.out, report)}")


if __name__ == "__main__":
    main()
