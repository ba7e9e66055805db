"""Training: Optuna-tuned XGBClassifier with nested MLflow runs, registered challenger."""
