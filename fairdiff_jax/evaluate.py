"""`python -m fairdiff_jax.evaluate`: the command line of fairdiff_jax/eval/evaluate.py (see its docstring)."""

from fairdiff_jax.eval.evaluate import main

if __name__ == "__main__":
    main()
