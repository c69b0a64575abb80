"""Checkpoint conversion between Llama-family checkpoints and LongLLaMA (installed as `longllama.conversion`)."""
