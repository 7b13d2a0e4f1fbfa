"""Building blocks shared by the generator and the judges: the attention kernel switch, small layers, the
pre-norm transformer encoder, and the PyTorch-checkpoint -> Flax converter."""
