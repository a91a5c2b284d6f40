"""Baselines: raw counts, PCA, an autoencoder, and any embedding beside the raw counts."""
