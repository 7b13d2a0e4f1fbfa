"""`python -m fairdiff_jax.export`: the command line of fairdiff_jax/training/export.py (see its docstring)."""

import sys

from fairdiff_jax.training.export import main

if __name__ == "__main__":
    sys.exit(main())
