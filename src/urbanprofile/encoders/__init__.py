"""Encoders: layers, spatial priors and training loops shared by the learned region embedders."""
