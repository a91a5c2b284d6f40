"""Multi-modal embedders (UrbanFusion, UrbanVLP) over frozen encoder outputs, and their modality baselines."""
