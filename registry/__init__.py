"""Routing bundles: the on-disk format (`registry.bundle`) and versioned publication to MLflow
(`registry.mlflow_store`). Knows the bundle format, not the decoding loop."""
