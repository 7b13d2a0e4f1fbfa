"""Debiasing: the distributional alignment loss, the training step, optimiser and EMA, the device mesh,
checkpoints, the training loop and LoRA export."""
