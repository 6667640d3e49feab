"""Versioned publication of routing bundles to MLflow (`registry.mlflow_store`): publish, list, resolve, fetch.
The bundle format itself is the core's (`knnssd.bundle`); this package is the MLflow side only."""
