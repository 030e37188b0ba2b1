"""The example and bench scripts as modules, for the tests (they are programs run from their
folder, not an installed package)."""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(path: str, name: str | None = None, *, sibling_imports: bool = False):
    """The script at ``path`` (relative to the repository) as the module ``name`` (by default
    its file name), loaded once and registered in ``sys.modules``, where Flax looks for the
    modules of its classes. ``sibling_imports`` puts the script's folder on ``sys.path``
    first, for scripts that import their neighbours (the bench scripts import ``timing``)."""
    path = os.path.join(ROOT, path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    if name not in sys.modules:
        folder = os.path.dirname(path)
        if sibling_imports and folder not in sys.path:
            sys.path.insert(0, folder)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
