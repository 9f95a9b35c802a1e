"""Import a script from tools/ as a module, so tests can call its functions directly."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load_tool_module(path: Path, module_name: str) -> ModuleType:
    """Execute ``path`` as a fresh module named ``module_name`` and return it."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
