"""Multi-view graph embedders (MVURE, MGFN, HAFusion, SREL): the shared training loop, layers and graphs."""
