"""Test configuration shared by all test modules.

Four host CPU devices are requested *before* JAX is imported anywhere, so that the
multi-device tests (pmap, shard_map, NamedSharding) run on a plain CPU machine. Every other
test uses the default device, as it would without the flag.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
