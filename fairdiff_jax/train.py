"""`python -m fairdiff_jax.train`: the command line of fairdiff_jax/training/loop.py (see its docstring)."""

import sys

from fairdiff_jax.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
