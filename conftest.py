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
# One persistent compilation cache for the suite, its subprocesses and later runs: a program
# built again (a run, the same run resumed, an evaluation) compiles once, and a rerun of the
# suite recompiles only what changed. The key includes the program, the flags and jaxlib's
# version; `make clean` removes the folder.
_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".pytest_cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
