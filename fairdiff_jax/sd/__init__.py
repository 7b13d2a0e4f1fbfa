"""The generator: Stable Diffusion's networks (UNet, VAE decoder, CLIP text encoder), its folder loader,
the DPM-Solver++ sampler with the adjusted-DFT variant, LoRA trees and their file formats, generation and its image-folder manifest (what made each folder)."""
