"""Test configuration shared by all test modules.

Four host CPU devices are requested *before* JAX is imported anywhere, so that the
multi-device tests (pmap, shard_map, NamedSharding) run on a plain CPU machine. Every other
test uses the default device, as it would without the flag.

Most of the suite's time is XLA compiling small programs that then run for milliseconds, so
the suite compiles at XLA's lowest optimisation level (``JAX_OPTIMIZATION_LEVEL=O0`` and
LLVM's ``--xla_backend_optimization_level=0``: a quarter of the time), and each process runs
XLA on one thread (``make test`` runs one process per core). The computations are the same,
compiled with fewer optimisations. XLA's CPU fusions are emitted by its earlier LLVM emitters
(``--xla_cpu_use_fusion_emitters=false``), which compile them 3x faster than the default MLIR
ones (an implicit-VI training step: 2.7 s against 0.9 s). Set ``XLA_FLAGS`` or
``JAX_OPTIMIZATION_LEVEL`` yourself to test with other settings.

The LAPACK behind jaxlib's and NumPy's decompositions runs single-threaded: its worker threads
wait by spinning, and on a CPU shared with other processes (or XLA's own thread pool) a small
QR then took 900 ms instead of 1 ms, which made the exact-entropy tests 30x slower.
"""

import importlib.metadata
import os

_FLAGS = (
    "--xla_force_host_platform_device_count=4",
    "--xla_backend_optimization_level=0",
    "--xla_cpu_multi_thread_eigen=false",
)
# XLA aborts on a flag it does not know: the emitter switch only for the jaxlib series it was
# measured with (constraints.txt pins it).
if importlib.metadata.version("jaxlib").startswith("0.10."):
    _FLAGS += ("--xla_cpu_use_fusion_emitters=false",)
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_OPTIMIZATION_LEVEL", "O0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def module_compilation_cache(tmp_path_factory):
    """A persistent compilation cache in a temporary folder while one test module runs.

    Programs that build their jitted functions anew on every call (a run, the same run stopped
    and resumed, an evaluation) then compile each program once, as separate processes sharing
    ``JAX_COMPILATION_CACHE_DIR`` would. JAX's settings are restored afterwards.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    options = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("compilation_cache")),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    saved = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # the cache is set up at the next compilation
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
