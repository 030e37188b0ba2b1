"""Atomic files and checkpoints: a crash at any moment leaves the old file or the new one.

A checkpoint is one ``.npz`` file: the leaves of a pytree of arrays, the text of its tree
structure, and a JSON ``meta`` dictionary (epoch, settings, log). Reading it back needs a
template with the same structure, shapes and dtypes (e.g. a freshly initialised state), so
that a checkpoint of another model or optimizer is refused with a clear message instead of
being loaded into the wrong places. Nothing is unpickled.

Example:
  >>> import os, tempfile, numpy as np
  >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.npz")
  >>> state = {"params": np.arange(3.0), "step": np.int32(7)}
  >>> save_checkpoint(path, state, {"epoch": 2})
  >>> restored, meta = load_checkpoint(path, state)
  >>> restored["params"].tolist(), int(restored["step"]), meta
  ([0.0, 1.0, 2.0], 7, {'epoch': 2})
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


class CheckpointError(Exception):
    """A checkpoint is missing, damaged, or does not match the run's model and optimizer."""


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb"):
    """Open a temporary file next to ``path`` for writing; on success, rename it over ``path``.

    The file is flushed to disk before ``os.replace`` (atomic), so a crash at any moment leaves
    either the previous file or the new one at ``path``, never a partial file; the temporary
    file is removed on failure.
    """
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: str, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def to_host(tree):
    """The pytree with every leaf copied to the host as a NumPy array (bit-exact)."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


def save_checkpoint(path: str, state, meta: dict) -> None:
    """Write the arrays of ``state`` (any pytree) and the JSON-able ``meta`` to ``path``,
    atomically."""
    leaves, tree_def = jax.tree.flatten(to_host(state))
    arrays = {f"leaf_{i:05d}": leaf for i, leaf in enumerate(leaves)}
    with atomic_open(path) as f:
        np.savez(f, structure=np.array(str(tree_def)), meta=np.array(json.dumps(meta)), **arrays)


def load_meta(path: str) -> dict:
    """Only the ``meta`` of a checkpoint (to rebuild the run before its state is read).

    Raises:
      CheckpointError: the file is missing or unreadable.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    try:
        with np.load(path, allow_pickle=False) as saved:
            return json.loads(str(saved["meta"]))
    except Exception as e:  # zipfile, KeyError, ValueError, ... for a damaged file
        raise CheckpointError(f"cannot read {path!r} ({type(e).__name__}: {e})") from e


def load_checkpoint(path: str, template) -> tuple[Any, dict]:
    """Read a checkpoint into the structure of ``template`` (a pytree of arrays).

    Returns:
      ``(tree, meta)``: NumPy leaves in ``template``'s structure, and the saved ``meta``.

    Raises:
      CheckpointError: the file is missing, unreadable, or was saved for another structure,
        shape or dtype.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    expected, tree_def = jax.tree.flatten(template)
    try:
        with np.load(path, allow_pickle=False) as saved:
            structure, meta = str(saved["structure"]), json.loads(str(saved["meta"]))
            count = sum(name.startswith("leaf_") for name in saved.files)
            leaves = [saved[f"leaf_{i:05d}"] for i in range(count)]
    except Exception as e:  # zipfile, KeyError, ValueError, ... for a damaged file
        raise CheckpointError(f"cannot read {path!r} ({type(e).__name__}: {e})") from e
    if structure != str(tree_def) or len(leaves) != len(expected):
        raise CheckpointError(f"{path!r} was saved for another model or optimizer")
    for leaf, like in zip(leaves, expected):
        like = np.asarray(like) if not hasattr(like, "dtype") else like
        if leaf.shape != like.shape or leaf.dtype != like.dtype:
            raise CheckpointError(
                f"{path!r}: an array of {leaf.dtype}{list(leaf.shape)} where the run has "
                f"{like.dtype}{list(like.shape)}"
            )
    return jax.tree.unflatten(tree_def, leaves), meta


def new_run_folder(base: str) -> str:
    """Create ``{base}/run_{k}`` with the first free k and return it. Under
    ``jax.distributed`` process 0 chooses k and the other processes receive it."""
    k = 0
    if jax.process_index() == 0:
        os.makedirs(base, exist_ok=True)
        while True:
            try:
                os.mkdir(os.path.join(base, f"run_{k}"))
                break
            except FileExistsError:
                k += 1
    if jax.process_count() > 1:
        k = int(multihost_utils.broadcast_one_to_all(np.int32(k)))
    return os.path.join(base, f"run_{k}")
