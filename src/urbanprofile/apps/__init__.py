"""Applications built on the toolkit that do not go through the benchmark runner."""
