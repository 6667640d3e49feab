"""Calibration stages: data, per-domain search, embeddings, and the reduce stage that builds bundles."""
