"""Raw tables: the churn simulator, their layout on disk and their loaders."""

import importlib
from typing import Any

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "SimulationSpec": "mlflow_churn.data.simulator",
    "simulate": "mlflow_churn.data.simulator",
    "read_manifest": "mlflow_churn.data.simulator",
    "TablePaths": "mlflow_churn.data.tables",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
