"""`python -m fairdiff_jax.generate`: the command line of fairdiff_jax/sd/generation.py (see its docstring)."""

from fairdiff_jax.sd.generation import main

if __name__ == "__main__":
    main()
