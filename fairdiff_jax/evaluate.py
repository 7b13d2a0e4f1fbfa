"""`python -m fairdiff_jax.evaluate`: the command line of fairdiff_jax/eval/cli.py (see its docstring)."""

from fairdiff_jax.eval.cli import main

if __name__ == "__main__":
    main()
