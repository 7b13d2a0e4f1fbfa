"""Debiasing: the distributional alignment loss, the training step, optimiser and EMA, the device mesh,
checkpoints, the training loop and LoRA export, and what keeps a run honest: the non-finite step guard
(health) and the workdir's lock, resumed-config check and metrics trim (workdir)."""
