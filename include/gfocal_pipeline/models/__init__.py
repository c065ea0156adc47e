"""Model adapters, one package each (registered by name in `gfocal_pipeline.adapters`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports each of `names` (name -> module) on first
    use, so that importing the package (e.g. for its data-only `spec`) loads no torch."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
