"""`python -m fairdiff_jax.train`: the command line of fairdiff_jax/training/loop.py (see its docstring)."""

import os
import sys

from fairdiff_jax.training.loop import main

if __name__ == "__main__":
    code = main()
    if code == 1:
        # The run failed (a failed save, a full disk) and main has said why. orbax's unfinished write coroutines
        # would print tracebacks at interpreter shutdown, after that line; everything is closed, so end here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
