"""Test-wide settings: CPU only, torch on one thread per pytest worker (2 workers share 2 cores)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import torch  # noqa: E402

torch.set_num_threads(1)
