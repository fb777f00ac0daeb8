"""The model: the masked Vision Transformer (``vit``), its attention core with a hand-written
backward (``attention``), the model a config describes (``build``) and the token statistics
it sows, as log metrics (``token_stats``)."""
