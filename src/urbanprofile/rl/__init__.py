"""Urban-R1-style post-training of a language-model region profiler (GRPO with geography-balanced batches)."""
