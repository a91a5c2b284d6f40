"""Encoders: frozen pretrained modality encoders (text, image, location, LLM) with their cache, and the
layers and spatial priors the learned embedders share."""
