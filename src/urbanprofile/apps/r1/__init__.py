"""Urban-R1: GRPO post-training of a small language model to predict region indicators."""
