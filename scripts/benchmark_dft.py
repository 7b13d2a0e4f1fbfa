"""Adjusted direct finetuning: one value-and-grad of the differentiable sampler, fairdiff_jax vs the
original's PyTorch computation, in one run.

Both sides: the same random-weight model (the JAX params converted from the PyTorch modules), a LoRA
of the given rank on the UNet or on the text encoder, n DPM-Solver++(2M) steps with guidance 7.5,
VAE decode, clamp, loss = sum(images * fixed weights), gradient w.r.t. the LoRA.
  - fairdiff_jax: `adjusted_dft.sample_images_adjusted` in one jitted value_and_grad (text padded to 77
    tokens with masks; UNet call and VAE decode under jax.checkpoint; stop-gradient on UNet inputs).
  - PyTorch: tests/dft_torch_reference.py, the original's loop (detached UNet inputs, scheduler step
    on the undetached latents, c_i backward hooks, no activation checkpointing), LoRA added the
    diffusers 0.19 way (tests/lora_torch_reference.py), base weights frozen.

Memory, per side:
  - JAX: `compiled.memory_analysis().temp_size_in_bytes`, XLA's peak scratch for the whole program
    (residuals kept for the backward pass and working memory; arguments and outputs excluded).
  - PyTorch: the bytes autograd saves for the backward pass (torch.autograd.graph.saved_tensors_hooks,
    distinct storages, model weights excluded), i.e. the activations the original keeps.
  - CPU, both sides: peak resident-set growth during the timed calls (malloc_trim first, then a
    thread samples /proc/self/statm every millisecond; coarse, includes allocator slack).
  - CUDA PyTorch: torch.cuda.max_memory_allocated() growth during the timed calls.
Timings exclude the first call (compilation, warm-up), reported separately.

    .venv/bin/python scripts/benchmark_dft.py                          # tiny model on CPU
    .venv/bin/python scripts/benchmark_dft.py --sd15-shapes --batch_sizes 1,2 --steps 10,20 --dtype bfloat16
"""

import argparse
import ctypes
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import torch
from flax import traverse_util

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the PyTorch references live with the tests

from benchmark_sampling import DTYPES, PROMPT, jax_model_from_torch  # noqa: E402
from dft_torch_reference import encode_prompt_pair as torch_encode_prompt_pair  # noqa: E402
from dft_torch_reference import sample_images_adjusted as torch_sample_images_adjusted  # noqa: E402
from lora_torch_reference import attach_unet_lora, patch_text_encoder  # noqa: E402
from random_models import SD15_TEXT, SD15_UNET, SD15_VAE  # noqa: E402

from fairdiff_jax.sd import adjusted_dft, lora
from fairdiff_jax.sd import tiny as tiny_sd
from fairdiff_jax.sd.loader import encode_text, tokenize_prompt_pair

GUIDANCE = 7.5
MIB = 2**20


class PeakRSS:
    """Peak growth of this process's resident set while the context is open (Linux /proc), in bytes.
    Free heap memory is first handed back to the OS (glibc malloc_trim), so reused memory counts."""

    def __enter__(self):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._page = 4096
        self._start = self._peak = self._rss()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self):
        while self._running:
            self._peak = max(self._peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.growth = self._peak - self._start


def timed(fn, repeats: int) -> tuple[float, float, int]:
    """(seconds of the first call, mean seconds of the next `repeats`, peak RSS growth over those)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    with PeakRSS() as rss:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        mean = (time.perf_counter() - start) / repeats
    return first, mean, rss.growth


def trained_like_lora(params, target, rank):
    """lora.init with `up` moved off zero, as after some training (a zero `up` gives `down` no gradient)."""
    key = jax.random.key(0)
    flat = traverse_util.flatten_dict(lora.init(key, params, lora.select_targets(params, target), rank))
    for i, path in enumerate(p for p in flat if p[-1] == "up"):
        flat[path] = 0.01 * jax.random.normal(jax.random.fold_in(key, i), flat[path].shape)
    return traverse_util.unflatten_dict(flat)


def jax_value_and_grad(sd, target, rank, batch, steps):
    """(compiled value_and_grad w.r.t. a LoRA on `target`, its arguments, compile seconds)."""
    tree = trained_like_lora(sd.unet_params if target == "unet" else sd.text_encoder_params, target, rank)
    ids, text_mask, context_mask = tokenize_prompt_pair(sd.tokenizer, PROMPT, pad_to=sd.tokenizer.model_max_length)
    frozen_hidden = encode_text(sd.text_encoder, sd.text_encoder_params, ids, text_mask)
    schedule = sd.schedule(steps)
    scales = adjusted_dft.dft_gradient_scales(sd.scheduler_config, schedule)
    h, w, c = sd.latent_shape
    noise = jax.random.normal(jax.random.key(1), (batch, h, w, c))
    weights = jax.random.normal(jax.random.key(2), (batch, sd.image_size, sd.image_size, 3))

    def loss(tree, frozen, noise, weights):
        unet_params, text_params, vae_params = frozen
        if target == "unet":
            unet_params, hidden = lora.merge(unet_params, tree), frozen_hidden
        else:
            hidden = sd.text_encoder.apply({"params": lora.merge(text_params, tree)}, ids, text_mask)
        images = adjusted_dft.sample_images_adjusted(
            sd.unet, unet_params, sd.vae, vae_params, schedule, scales, noise, hidden[1:], hidden[:1], GUIDANCE,
            context_mask,
        )
        return jnp.sum(images * weights)

    jax_args = (tree, (sd.unet_params, sd.text_encoder_params, sd.vae_params), noise, weights)
    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(*jax_args).compile()
    return compiled, jax_args, time.perf_counter() - start


def torch_value_and_grad(pipe, target, rank, batch, steps, device, dtype):
    """A closure running the original's computation + backward for a LoRA on `target`."""
    for p in [*pipe.unet.parameters(), *pipe.text_encoder.parameters(), *pipe.vae.parameters()]:
        p.requires_grad_(False)
    if target == "unet":
        processors, handles = attach_unet_lora(pipe.unet, rank, up_std=0.01)
        lora_params = [p for m in processors.values() for p in m.parameters()]
        for m in processors.values():
            m.to(device)  # LoRA factors stay float32, as the original's
    else:
        patch_text_encoder(pipe.text_encoder, rank, up_std=0.01)
        handles = []
        lora_params = [p for n, p in pipe.text_encoder.named_parameters() if "lora_linear_layer" in n]
        pipe.text_encoder.to(device)
    for p in lora_params:
        p.requires_grad_(True)
    weight_storages = {
        p.untyped_storage().data_ptr()
        for m in (pipe.unet, pipe.text_encoder, pipe.vae) for p in [*m.parameters(), *m.buffers()]
    }
    saved = {}  # storage pointer -> bytes, of the tensors autograd keeps for backward

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weight_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    h = w = pipe.unet.config.sample_size
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, 4, h, w, generator=gen).to(device)
    size = h * pipe.vae_scale_factor
    weights = torch.randn(batch, 3, size, size, generator=gen).to(device)

    def run():
        for p in lora_params:
            p.grad = None
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            with torch.set_grad_enabled(target == "text_encoder"):
                cond, uncond = torch_encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, PROMPT)
            images = torch_sample_images_adjusted(
                pipe.unet, pipe.vae, pipe.scheduler, steps, noise.to(dtype), cond, uncond, GUIDANCE
            )
            loss = (images.float() * weights).sum()
        run.saved_bytes = sum(saved.values())
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    def remove():
        for handle in handles:
            handle.remove()

    return run, remove


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15-shapes", action="store_true", help="SD v1-5-sized random model instead of the tiny one")
    parser.add_argument("--batch_sizes", default="1,2,4")
    parser.add_argument("--steps", default="10,20")
    parser.add_argument("--targets", default="unet,text_encoder", help="which LoRA the gradient is taken for")
    parser.add_argument("--rank", type=int, help="LoRA rank (default: 50 with --sd15-shapes, as the experiment; 4 tiny)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="both frameworks' frozen model dtype")
    parser.add_argument("--attention_impl", default="xla", help="the JAX side's attention kernel")
    parser.add_argument("--torch_threads", type=int, help="PyTorch CPU threads")
    parser.add_argument("--skip_torch", action="store_true")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rank = args.rank or (50 if args.sd15_shapes else 4)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    step_counts = [int(n) for n in args.steps.split(",")]
    targets = args.targets.split(",")
    jax_dtype, torch_dtype = DTYPES[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    configs = dict(unet_config=SD15_UNET, vae_config=SD15_VAE, text_encoder_config=SD15_TEXT) if args.sd15_shapes else {}
    base_pipe = tiny_sd.build_torch_pipeline(seed=0, **configs)
    sd = jax_model_from_torch(base_pipe, jax_dtype, args.attention_impl)
    h, w, c = sd.latent_shape
    print(f"model: {'SD v1-5 shapes' if args.sd15_shapes else 'tiny'}, {sd.image_size}x{sd.image_size} images, "
          f"LoRA rank {rank}, {args.dtype}; JAX on {jax.devices()[0].platform}, PyTorch on {device}")
    print("memory: XLA temp = compiled.memory_analysis().temp_size_in_bytes; saved = PyTorch's saved-for-backward "
          "tensors; RSS = peak resident-set growth during the timed calls"
          + ("; CUDA = torch.cuda.max_memory_allocated growth" if device == "cuda" else ""))
    header = f"{'target':>12} {'B':>2} {'n':>3} | {'jax s':>8} {'compile s':>9} {'XLA temp MiB':>12} {'RSS MiB':>8}"
    if not args.skip_torch:
        memory = "CUDA MiB" if device == "cuda" else "RSS MiB"
        header += f" | {'torch s':>8} {'saved MiB':>9} {memory:>8} | {'time ratio':>10}"
    print(header)
    temps, torch_saved = {}, {}
    for target in targets:
        for batch in batch_sizes:
            for steps in step_counts:
                compiled, jax_args, compile_s = jax_value_and_grad(sd, target, rank, batch, steps)
                temp = compiled.memory_analysis().temp_size_in_bytes
                temps[target, batch, steps] = temp
                run_jax = lambda: jax.block_until_ready(compiled(*jax_args))
                _, jax_s, jax_rss = timed(run_jax, args.repeats)
                row = f"{target:>12} {batch:>2} {steps:>3} | {jax_s:8.3f} {compile_s:9.1f} {temp / MIB:12.1f} {jax_rss / MIB:8.1f}"
                if not args.skip_torch:
                    pipe = tiny_sd.build_torch_pipeline(seed=0, **configs).to(device, torch_dtype)
                    run_torch, remove = torch_value_and_grad(pipe, target, rank, batch, steps, device, torch_dtype)
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                        before = torch.cuda.memory_allocated()
                    _, torch_s, torch_rss = timed(run_torch, args.repeats)
                    torch_mem = torch.cuda.max_memory_allocated() - before if device == "cuda" else torch_rss
                    remove()
                    del pipe
                    torch_saved[target, batch, steps] = run_torch.saved_bytes
                    row += f" | {torch_s:8.3f} {run_torch.saved_bytes / MIB:9.1f} {torch_mem / MIB:8.1f} | {torch_s / jax_s:10.2f}"
                print(row, flush=True)

    latent_bytes = lambda b: b * h * w * c * 4
    lo, hi = min(step_counts), max(step_counts)
    if lo == hi:
        return
    print("\nMemory growth per extra step (JAX: should be about the one latent batch kept per step):")
    for target in targets:
        for batch in batch_sizes:
            per_step = lambda table: (table[target, batch, hi] - table[target, batch, lo]) / (hi - lo) / 1024
            line = f"  {target:>12} B={batch}: XLA temp {per_step(temps):9.1f} KiB/step"
            if torch_saved:
                line += f", PyTorch saved-for-backward {per_step(torch_saved):9.1f} KiB/step"
            print(line + f"; one float32 latent batch = {latent_bytes(batch) / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
