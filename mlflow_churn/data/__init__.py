"""Raw tables: the churn simulator, their layout on disk and their loaders."""

from mlflow_churn.lazy import lazy_exports

#: public name -> the module that defines it (imported on first use: `import mlflow_churn.X` stays light)
_EXPORTS = {
    "SimulationSpec": "mlflow_churn.data.simulator",
    "simulate": "mlflow_churn.data.simulator",
    "read_manifest": "mlflow_churn.data.simulator",
    "TablePaths": "mlflow_churn.data.tables",
    "DataBounds": "mlflow_churn.data.bounds",
    "data_bounds": "mlflow_churn.data.bounds",
    "latest_as_of": "mlflow_churn.data.bounds",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
