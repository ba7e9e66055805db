"""Package ``__all__`` whose names are imported on first use (PEP 562), so that
``import mlflow_churn.<package>`` stays light (the CLI's ``--help`` imports no MLflow)."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str],
                 deprecated: Mapping[str, str] | None = None) -> tuple[Callable[[str], Any],
                                                                     Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` publishing ``exports`` (public
    name -> the module that defines it, or ``"module:attribute"`` when the module names it
    otherwise). ``deprecated`` (old name -> public name) still resolves, with a
    ``DeprecationWarning``, and is left out of ``__all__``."""
    names = sorted(exports)
    old_names = dict(deprecated or {})

    def __getattr__(name: str) -> Any:
        if name in old_names:
            new = old_names[name]
            warnings.warn(f"{package}.{name} is deprecated; use {package}.{new}", DeprecationWarning,
                          stacklevel=2)
            return __getattr__(new)
        if name in exports:
            module, _, attr = exports[name].partition(":")
            return getattr(importlib.import_module(module), attr or name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__, names


__all__ = ["lazy_exports"]
