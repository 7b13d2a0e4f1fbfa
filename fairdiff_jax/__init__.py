"""fairdiff_jax: debias Stable Diffusion v1-5 with distributional alignment (Shen et al., ICLR 2024) in JAX/Flax."""
