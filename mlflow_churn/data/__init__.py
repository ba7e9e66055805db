"""Raw tables: the churn simulator, their layout on disk and their loaders."""
