"""Test-wide settings: CPU only, torch on one thread per pytest worker (2 workers share 2 cores), and POT kept
from importing TensorFlow (tests import `ot` directly; TF loaded beside torch crashes torchvision's import)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("POT_BACKEND_DISABLE_TENSORFLOW", "1")
os.environ.setdefault("POT_BACKEND_DISABLE_PYTORCH", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
