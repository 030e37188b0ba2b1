"""Test configuration shared by all test modules.

Four host CPU devices are requested *before* JAX is imported anywhere, so that the
multi-device tests (pmap, shard_map, NamedSharding) run on a plain CPU machine. Every other
test uses the default device, as it would without the flag.

The LAPACK behind jaxlib's and NumPy's decompositions runs single-threaded: its worker threads
wait by spinning, and on a CPU shared with other processes (or XLA's own thread pool) a small
QR then took 900 ms instead of 1 ms, which made the exact-entropy tests 30x slower.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
