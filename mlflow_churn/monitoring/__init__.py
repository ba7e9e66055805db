"""Monitoring: drift engine, performance tracking, retraining policy."""
