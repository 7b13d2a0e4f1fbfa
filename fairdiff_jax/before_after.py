"""`python -m fairdiff_jax.before_after`: the command line of fairdiff_jax/eval/before_after.py (see its docstring)."""

from fairdiff_jax.eval.before_after import main

if __name__ == "__main__":
    main()
