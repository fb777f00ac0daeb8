"""The model: the masked Vision Transformer."""
