"""Seconds per debiasing training step and its parts, XLA-counted FLOPs, and the gradient stage's memory at
SD-1.5 shapes.

    python scripts/benchmark_train_step.py                  # tiny random models (configs/tiny.py), CPU
    python scripts/benchmark_train_step.py --assets /tmp/tiny_assets --steps 3
    python scripts/benchmark_train_step.py --no-torch      # the JAX step alone
    python scripts/benchmark_train_step.py --config configs/debias_text_encoder.py --config.assets_dir=/data/assets
    python scripts/benchmark_train_step.py --sd15-shapes    # compile only: XLA memory analysis of the gradient
                                                            # stage at SD-1.5 shapes (no weights allocated)

A step = sampling (X with the LoRA and X0 frozen, no gradient), faces (detection of both on the host,
chips, classifier, CLIP / DINOv2 / SFNet features of X0), OT (host), gradient (adjusted-DFT regeneration,
losses, backward, AdamW + EMA). The first step of each denoising-step count compiles; timings are of later
steps with the same count (train.max_denoising_steps). FLOPs: `compiled.cost_analysis()` of each jitted stage
at that count; XLA counts the body of a while loop once, so the denoising-step scan, the sampling chunks and the
micro-batch scan are counted for one iteration each: lower bounds. Each is also given times its loops' trip
counts (as if all of the stage ran inside its innermost loop): an upper estimate. The true count lies between.

In the same run (unless --no-torch), scripts/torch_train_step.py times a PyTorch step of the same math and
work (the original's computation: diffusers UNet / VAE / DPMSolverMultistepScheduler, transformers CLIP text,
CLIP vision and DINOv2, torchvision mobilenet_v3_large, the PyTorch SFNet-20, kornia; diffusers-0.19 LoRA layers;
detached UNet inputs and c_i gradient hooks; torch AdamW + diffusers EMAModel) from the same asset files: the
same images per step, generation chunks, micro-batches, denoising steps and detector. Its first step is a
warm-up. Then `--steps` rounds of one JAX step and one PyTorch step, alternating which goes first (JAX in odd
rounds), so that the load of a shared machine falls on both sides alike. Output:
  - thread settings: XLA's CPU pool = the process's usable cores (os.sched_getaffinity); torch.set_num_threads
    gets the same number; OMP_WAIT_POLICY is set to PASSIVE unless given (with spinning OpenMP workers the
    PyTorch sampling ran 20-70x slower, erratically, on a 2-core machine shared with other jobs; XLA's idle
    workers sleep too);
  - per-step timings (and the PyTorch loss), then per part the median [min .. max] seconds of each side and the
    ratio of the medians, and the median [min .. max] of the rounds' own step ratios PyTorch s / JAX s (the
    two steps of a round run back to back: the figure least moved by a change in load). OT is the same host code in both steps
    (ot_targets.optimal_transport_targets): it is shown once, timed in the JAX step; both totals include it;
  - on an accelerator, the achieved fraction of peak of the JAX step, per part and per step: XLA-counted FLOPs
    (the bracket above) / seconds / the device's dense peak FLOP/s (PEAK_FLOPS, by device_kind; bfloat16 and
    float32); "n/a on CPU" otherwise.

--sd15-shapes lowers the gradient stage with abstract arrays (jax.ShapeDtypeStruct) for SD v1-5 (UNet,
VAE decoder, CLIP text), CLIP ViT-H/14, DINOv2 ViT-B/14, mobilenet_v3_large (6 classes) and SFNet-20 in
bfloat16, 512x512 images, 23 denoising steps, 20 images per device in micro-batches of 4 (text-encoder
LoRA) and of 3 (UNet LoRA), and prints XLA's memory analysis per device (target: <= 32 GiB). The UNet and
the VAE decoder run with remat and `--attention_impl` (default 'chunked'; 'cudnn' on a GPU). It compiles
for the machine's first device: run it where the training runs. On a CPU (measured 2026-11-27, ~5 min
per compile) it reports 29.2 GiB (text-encoder LoRA) and 24.6 GiB (UNet LoRA) with 'chunked' attention;
with 'xla' attention and no VAE remat it reported 84 GiB and 76 GiB, of which the UNet's backward at
batch 8 with materialised 4096x4096 attention was ~77 GiB and the VAE decode's backward at batch 4 ~19 GiB.
The CPU compiler upcasts bf16, so these are upper bounds, not the GPU numbers.

    python scripts/benchmark_train_step.py --sd15-shapes --sd15-lora unet --attention_impl cudnn   # on a GPU

--sd15-unet-equivalents counts, from compiled one-denoising-step programs at SD-1.5 shapes (compile only), the
UNet-forward equivalents per image per denoising step of each adjusted-DFT gradient path (config.train.dft_gradient):
"rerun" (regenerate under remat, the original's way) and "stored_trajectory" (VJPs at the stored latents); see
unet_equivalents. Measured 2026-12-02: tiny shapes, float32: rerun 5.70 / 5.94, stored 4.71 / 4.95 (text-encoder / UNet LoRA);
SD-1.5 shapes, bfloat16: rerun 5.84 / 5.98, stored 4.85 / 4.98.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Read by the OpenMP runtime when torch loads (see the docstring); before any import that may load torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # config files import `configs.common`

import random_models  # noqa: E402  (scripts/, on sys.path when a script runs)

from fairdiff_jax import config_cli
from fairdiff_jax.judging import judges as judges_lib
from fairdiff_jax.nn.attention import ATTENTION_IMPLS
from fairdiff_jax.sd import adjusted_dft, sampler
from fairdiff_jax.training import optim, parallel
from fairdiff_jax.training import step as debias_step
from fairdiff_jax.training.stages import Stages, Text, largest_divisor_at_most
from fairdiff_jax.training.loop import load_models

GIB = 2**30
PROMPT = "a photo of the face of a doctor"
PARTS = ("sampling", "faces", "ot", "gradient")

# Dense peak FLOP/s (no sparsity) from the vendors' data sheets: (bfloat16 on the tensor / matrix units,
# float32 without tensor cores, None where none is published). The first entry whose key is part of
# jax.devices()[0].device_kind applies ('TPU v5 lite' is v5e's device_kind).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 51.2e12),
    ("H100", 989.4e12, 66.9e12),
    ("H200 NVL", 835.5e12, 60.3e12),
    ("H200", 989.4e12, 66.9e12),
    ("A100", 312e12, 19.5e12),
    ("TPU v4", 275e12, None),
    ("TPU v5 lite", 197e12, None),
    ("TPU v5e", 197e12, None),
)


def cost_flops(jitted, *args, **kwargs) -> float:
    analysis = jitted.lower(*args, **kwargs).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def peak_flops(device_kind: str) -> tuple[float | None, float | None] | None:
    """(bfloat16, float32) dense peak FLOP/s of a device kind from PEAK_FLOPS, None if it is not listed."""
    for key, bf16, fp32 in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return bf16, fp32
    return None


def usable_cores() -> int:
    """The cores this process may run on: the size of XLA's CPU thread pool, and the PyTorch thread count."""
    return len(os.sched_getaffinity(0))


def median_parts(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} if rows else {}


def step_setup(config, sd, judges, judge_variables, mesh):
    """(stages, jitted train step, frozen weights, train state) of a run of `config` with these models on `mesh`."""
    stages = Stages(sd, judges, config, mesh, judges_lib.make_detector(config))
    frozen = parallel.replicate(debias_step.frozen_weights(sd, judge_variables), mesh)
    lora = debias_step.init_lora(jax.random.key(0), sd, config.lora.rank, config.lora.train_text_encoder, config.lora.train_unet)
    o = config.optim
    tx = optim.optimizer_from_config(o)
    state = parallel.replicate(optim.create_train_state(lora, tx, o.ema_decay, 0), mesh)
    return stages, debias_step.make_train_step(stages), frozen, state


def jax_step(stages, train_step, state, frozen, num_steps: int, step: int, prompt: str = PROMPT):
    """Runs training step `step` -> (seconds per part and 'total', its Prepared, the state after it)."""
    timings = {}
    started = time.perf_counter()
    prepared = debias_step.prepare(stages, state.params, frozen, prompt, num_steps, step, debias_step.step_key(state.rng, step), timings)
    t0 = time.perf_counter()
    state, _ = train_step(state, prepared.constants, prepared.batch, jax.random.key(step))
    jax.block_until_ready(state.params)
    timings["gradient"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    return timings, prepared, state


def time_jax_steps(stages, train_step, state, frozen, num_steps: int, steps: int, prompt: str = PROMPT):
    """Runs steps 0..`steps` (step 0 compiles) and prints each one's parts; -> (median seconds per part over
    steps 1.., the per-step rows including step 0, the last step's Prepared, the state after the last step)."""
    rows = []
    for step in range(steps + 1):
        timings, prepared, state = jax_step(stages, train_step, state, frozen, num_steps, step, prompt)
        print(f"step {step}{' (compiles)' if step == 0 else ''}: " + ", ".join(f"{k} {v:.3f} s" for k, v in timings.items()), flush=True)
        rows.append(timings)
    seconds = median_parts(rows[1:])
    if seconds:
        print("median over steps 1..: " + ", ".join(f"{k} {v:.3f} s" for k, v in seconds.items()))
    return seconds, rows, prepared, state


def step_flops(stages, train_step, state, frozen, prepared, num_steps: int) -> dict:
    """XLA-counted FLOPs per device of each jitted part of a step: {part: (loop bodies counted once, x loop trips)}
    and their sum under 'step' (the module docstring says why this is a bracket). The stages must have run with
    these shapes already: their compiled executables are reused, nothing compiles again."""
    t = stages.config.train
    local = t.images_per_prompt // stages.num_devices
    chunk = largest_divisor_at_most(local, t.generation_batch_size)
    micro = min(t.micro_batch_size, local)
    batch, constants = prepared.batch, prepared.constants
    stored = t.dft_gradient == "stored_trajectory"
    counted = {
        "sampling": (cost_flops(stages._generate, state.params, frozen, constants.text, constants.schedule, batch.noise, chunk=chunk,
                                keep_trajectory=stored)
                     + cost_flops(stages._generate, {}, frozen, constants.text, constants.schedule, batch.noise, chunk=chunk),
                     (local // chunk) * num_steps),
        "faces": (cost_flops(stages._judge, frozen["judges"], prepared.images, prepared.original_images, batch.boxes,
                             batch.found, batch.original_boxes, batch.original_found, batch.chip_from_image), 1),
        "gradient": (cost_flops(train_step, state, constants, batch, jax.random.key(0)), -(-local // micro) * num_steps),
    }
    flops = {part: (value, value * trips) for part, (value, trips) in counted.items()}
    flops["step"] = tuple(sum(bounds) for bounds in zip(*flops.values()))
    for part, (lower, upper) in flops.items():
        print(f"XLA cost-analysis FLOPs per device, {part}: {lower:.3e} (loop bodies counted once) .. {upper:.3e} (x loop trips)")
    return flops


def benchmark_tiny(config, steps: int, run_torch: bool) -> None:
    """JAX step 0 (compiles) and PyTorch step 0 (warm-up), then `steps` rounds of one step of each, alternating which
    side goes first, so that a change in the machine's load falls on both sides alike."""
    mesh = parallel.make_mesh()
    stages, train_step, frozen, state = step_setup(config, *load_models(config), mesh)
    t = config.train
    num_steps = t.max_denoising_steps
    device_kind = jax.devices()[0].device_kind
    print(f"devices: {mesh.devices.size} x {device_kind}; {t.images_per_prompt} images per step, "
          f"{num_steps} denoising steps, generation chunks of {t.generation_batch_size}, micro-batch {t.micro_batch_size}, "
          f"adjusted-DFT gradient '{t.dft_gradient}'")

    def run_jax(step):
        nonlocal state, prepared
        timings, prepared, state = jax_step(stages, train_step, state, frozen, num_steps, step)
        print(f"JAX step {step}{' (compiles)' if step == 0 else ''}: " + ", ".join(f"{k} {v:.3f} s" for k, v in timings.items()), flush=True)
        return timings

    prepared = None
    sides = {"JAX": run_jax}
    if run_torch:
        sides["PyTorch"] = torch_step_runner(config, num_steps, PROMPT)
    for run in sides.values():
        run(0)
    rows = {side: [] for side in sides}
    for step in range(1, steps + 1):
        for side in sorted(sides, reverse=step % 2 == 0):  # JAX first in odd rounds, PyTorch first in even ones
            rows[side].append(sides[side](step))
    jax_seconds = median_parts(rows["JAX"])
    flops = step_flops(stages, train_step, state, frozen, prepared, num_steps)
    if run_torch and steps:
        print_comparison(rows["JAX"], rows["PyTorch"])
    if jax_seconds:
        print_fraction_of_peak(flops, jax_seconds, device_kind, config.model.dtype)


def torch_step_runner(config, num_steps: int, prompt: str):
    """`run(step) -> seconds per part and 'total'` of scripts/torch_train_step.py's step, timed like the JAX one."""
    import torch
    from torch_train_step import TorchTrainStep

    threads = usable_cores()
    torch.set_num_threads(threads)
    print(f"threads: JAX (XLA CPU pool) {threads} = usable cores (os.sched_getaffinity), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"PyTorch torch.set_num_threads({threads}): intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    step_runner = TorchTrainStep(config)
    print(f"PyTorch {torch.__version__} on {step_runner.device}, frozen networks in {step_runner.dtype}")

    def run(step: int) -> dict:
        timings = {}
        started = time.perf_counter()
        logs = step_runner.run(prompt, num_steps, step, timings)
        timings["total"] = time.perf_counter() - started
        shown = ", ".join(f"{k} {v:.3f} s" for k, v in timings.items() if k != "ot")
        print(f"PyTorch step {step}{' (warm-up)' if step == 0 else ''}: {shown}; loss {logs['loss']:.4f}"
              + ("" if logs["finite"] else " (non-finite gradient: update skipped)"), flush=True)
        return timings

    return run


def print_comparison(jax_rows: list[dict], torch_rows: list[dict]) -> None:
    """Per part: median [min .. max] seconds of each side over the timed rounds and the ratio of the medians; per
    step: the median [min .. max] of the rounds' own ratios (each round's two steps ran back to back)."""
    spread = lambda rows, part: [r[part] for r in rows]  # noqa: E731
    shown = lambda v: f"{statistics.median(v):.3f} [{min(v):.3f} .. {max(v):.3f}]"  # noqa: E731
    print(f"seconds per step over {len(jax_rows)} alternating rounds, median [min .. max], and PyTorch / JAX:")
    print(f"  {'part':<9} {'JAX s':>24} {'PyTorch s':>24} {'ratio of medians':>17}")
    for part in PARTS + ("total",):
        jax_values = spread(jax_rows, part)
        if part == "ot":
            print(f"  {part:<9} {shown(jax_values):>24}   (same host code: timed in the JAX step, in both totals)")
            continue
        torch_values = spread(torch_rows, part)
        print(f"  {part:<9} {shown(jax_values):>24} {shown(torch_values):>24} "
              f"{statistics.median(torch_values) / statistics.median(jax_values):17.2f}")
    ratios = [p["total"] / j["total"] for j, p in zip(jax_rows, torch_rows)]
    print(f"  step ratio PyTorch / JAX per round: median {statistics.median(ratios):.2f} [{min(ratios):.2f} .. {max(ratios):.2f}] "
          f"({', '.join(f'{r:.2f}' for r in ratios)})")


def print_fraction_of_peak(flops: dict, seconds: dict, device_kind: str, dtype: str) -> None:
    if jax.devices()[0].platform == "cpu":
        print("achieved fraction of peak FLOP/s: n/a on CPU")
        return
    peaks = peak_flops(device_kind)
    if peaks is None:
        print(f"achieved fraction of peak FLOP/s: no peak listed for {device_kind!r} (PEAK_FLOPS)")
        return
    bf16, fp32 = peaks
    print(f"achieved fraction of peak FLOP/s of the JAX step per {device_kind} (frozen networks in {dtype}; XLA's FLOPs of the "
          f"per-device programs, the bracket above; dense peaks: bf16 {bf16:.4g}" + (f", fp32 {fp32:.4g}" if fp32 else "") + " FLOP/s):")
    times = dict(seconds, step=seconds["total"])
    for part, bounds in flops.items():
        per_second = list(dict.fromkeys(f / times[part] for f in bounds))  # one value where the bracket is closed
        span = lambda peak: " .. ".join(f"{f / peak:.2%}" for f in per_second)  # noqa: E731
        line = f"  {part:<9} {' .. '.join(f'{f:.3g}' for f in per_second)} FLOP/s = {span(bf16)} of the bf16 peak"
        print(line + (f", {span(fp32)} of the fp32 peak" if fp32 else ""))


# ---- SD-1.5 shapes, compile only -------------------------------------------------------------------------


def sd15_memory(train_text_encoder: bool, train_unet: bool, micro_batch: int, images_per_device: int = 20,
                num_steps: int = 23, dtype=jnp.bfloat16, attention_impl: str = "chunked", dft_gradient: str = "stored_trajectory") -> None:
    from fairdiff_jax.judging import tiny as tiny_assets

    sd, judges, judge_variables = random_models.abstract_models(random_models.SHAPES["sd15"], dtype, attention_impl)
    mesh = parallel.make_mesh(jax.devices()[:1])
    config = config_cli.load_config(str(ROOT / "configs" / "debias_text_encoder.py"))
    config.lora.train_text_encoder, config.lora.train_unet = train_text_encoder, train_unet
    config.train.micro_batch_size, config.train.images_per_prompt = micro_batch, images_per_device
    config.train.dft_gradient = dft_gradient
    stages = Stages(sd, judges, config, mesh, tiny_assets.CentralFaceDetector())

    lora = jax.eval_shape(lambda: debias_step.init_lora(jax.random.key(0), sd, 50, train_text_encoder, train_unet))
    tx = optim.make_optimizer()
    state = jax.eval_shape(lambda l: optim.create_train_state(l, tx, 0.996, 0), lora)
    frozen = debias_step.frozen_weights(sd, judge_variables)
    schedule = sampler.make_schedule(sd.scheduler_config, num_steps)
    t = 77
    text = Text(jax.ShapeDtypeStruct((2, t), jnp.int32), jax.ShapeDtypeStruct((2, t), jnp.int32),
                jax.ShapeDtypeStruct((1, t), jnp.int32))
    constants = debias_step.StepConstants(frozen, text, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), schedule),
                                          jax.ShapeDtypeStruct((num_steps,), jnp.float32))
    b = images_per_device
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    flag = jax.ShapeDtypeStruct((b,), jnp.bool_)
    batch = debias_step.StepBatch(
        noise=f32(b, 64, 64, 4), crop_boxes=f32(b, 4), found=flag, boxes=f32(b, 4), chip_from_image=f32(b, 2, 3),
        targets=i32(b, 2), original_preds=i32(b, 2), original_probs=(f32(b, 2), f32(b, 4)), original_boxes=f32(b, 4),
        original_found=flag, original_clip=f32(b, 1024), original_dino=f32(b, 768), original_face=f32(b, 512),
        **(dict(final_latents=f32(b, 64, 64, 4), trajectory=f32(b, num_steps, 64, 64, 4))
           if config.train.dft_gradient == "stored_trajectory" else {}))
    started = time.perf_counter()
    compiled = debias_step.make_train_step(stages).lower(state, constants, batch, jax.random.key(0)).compile()
    memory = compiled.memory_analysis()
    part = "text encoder" if train_text_encoder and not train_unet else ("UNet" if not train_text_encoder else "both")
    print(f"SD-1.5 shapes, {part} LoRA, '{dft_gradient}' adjusted-DFT gradient, micro-batch {micro_batch}, {b} images per device, {num_steps} steps, "
          f"{jnp.dtype(dtype).name} frozen weights, '{attention_impl}' attention in the UNet and VAE (compiled in {time.perf_counter() - started:.0f} s on {jax.devices()[0].device_kind}):")
    if memory is None:
        print("  memory analysis not available on this backend")
        return
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    for field in fields:
        print(f"  {field}: {getattr(memory, field) / GIB:.2f} GiB")
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - memory.alias_size_in_bytes
    print(f"  peak estimate (arguments + outputs + temporaries - aliased): {total / GIB:.2f} GiB "
          f"({'within' if total <= 32 * GIB else 'OVER'} the 32 GiB target)")
    print(f"  XLA cost-analysis FLOPs of the gradient stage (loop bodies counted once): {float((compiled.cost_analysis() or {}).get('flops', float('nan'))):.3e}")


def unet_equivalents(lora_part: str, micro_batch: int = 1, dtype=jnp.bfloat16, attention_impl: str = "chunked",
                     shapes: str = "sd15") -> dict:
    """UNet-forward equivalents per image per denoising step of a training step (random_models.SHAPES[shapes]), per
    gradient path (step.DFT_GRADIENTS).

    XLA counts a loop body once, so the counts come from programs whose loops all run once: one denoising step, one
    image (the stored path's backward decodes one image at a time, a loop over the micro-batch), abstract inputs
    (compile only); every count is linear in the batch. U = FLOPs of one guided UNet call (the
    prompt and the empty prompt) per image; for each path, the gradient stage's per-step UNet work = FLOPs of the
    sampler's gradient (w.r.t. the UNet LoRA, or the prompt embeddings a text-encoder LoRA reaches) minus those of
    the VAE decode's gradient (once per image per step, not per denoising step). The no-gradient pass adds 2 U
    (the LoRA's images and the frozen model's). -> {path: equivalents}.
    """
    from fairdiff_jax.sd import lora as lora_lib

    sd, _, _ = random_models.abstract_models(random_models.SHAPES[shapes], dtype, attention_impl)
    m, (h, w, c) = micro_batch, sd.latent_shape
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    schedule = sampler.make_schedule(sd.scheduler_config, 1)
    scales = adjusted_dft.dft_gradient_scales(sd.scheduler_config, schedule)
    text, mask = f32(1, 77, sd.unet.config.cross_attention_dim), jax.ShapeDtypeStruct((1, 77), jnp.int32)
    latents, weights = f32(m, h, w, c), f32(m, sd.image_size, sd.image_size, 3)
    rank = 50 if shapes == "sd15" else 4
    targets = lora_lib.select_targets(sd.unet_params, "unet")
    unet_lora = jax.eval_shape(lambda: lora_lib.init(jax.random.key(0), sd.unet_params, targets, rank))
    trainable = unet_lora if lora_part == "unet" else {}

    def flops(fn, *args) -> float:
        started = time.perf_counter()
        value = cost_flops(jax.jit(fn), *args)
        print(f"  compiled {fn.__name__} in {time.perf_counter() - started:.0f} s: {value:.4e} FLOPs", flush=True)
        return value

    def guided_unet(params, x, cond, uncond, mask):
        eps_fn = lambda x, t, ctx, msk: sd.unet.apply({"params": params}, x, t, ctx, msk)  # noqa: E731
        return sampler.guided_eps(eps_fn, x, schedule.timesteps[0], cond, uncond, 7.5, mask)

    def decode_gradient(vae_params, x, weights):
        return jax.grad(lambda x: jnp.sum(jax.checkpoint(lambda x: sampler.decode_latents(sd.vae, vae_params, x))(x) * weights))(x)

    def rerun_gradient(unet_params, vae_params, trainable, cond, uncond, mask, noise, weights):
        def loss(trainable, cond, uncond):
            params = lora_lib.merge(unet_params, trainable) if trainable else unet_params
            images = adjusted_dft.sample_images_adjusted(sd.unet, params, sd.vae, vae_params, schedule, scales, noise, cond, uncond, 7.5, mask)
            return jnp.sum(images * weights)
        return jax.grad(loss, argnums=(0, 1, 2))(trainable, cond, uncond)

    def stored_gradient(unet_params, vae_params, trainable, cond, uncond, mask, trajectory, final, weights):
        def loss(trainable, cond, uncond):
            params_of = lambda t: lora_lib.merge(unet_params, t) if t else unet_params  # noqa: E731
            images = adjusted_dft.images_from_trajectory(sd.unet, params_of, trainable, sd.vae, vae_params, schedule, scales, trajectory,
                                                    final, cond, uncond, 7.5, mask)
            return jnp.sum(images * weights)
        return jax.grad(loss, argnums=(0, 1, 2))(trainable, cond, uncond)

    print(f"{shapes} shapes, {lora_part} LoRA, micro-batch {m}, one denoising step, {jnp.dtype(dtype).name}, '{attention_impl}' attention, "
          f"remat {sd.unet.remat} (compiles on {jax.devices()[0].device_kind}):", flush=True)
    unet = flops(guided_unet, sd.unet_params, latents, text, text, mask) / m
    decode = flops(decode_gradient, sd.vae_params, latents, weights)
    rerun = flops(rerun_gradient, sd.unet_params, sd.vae_params, trainable, text, text, mask, latents, weights)
    stored = flops(stored_gradient, sd.unet_params, sd.vae_params, trainable, text, text, mask, f32(m, 1, h, w, c), latents, weights)
    equivalents = {path: 2 + (value - decode) / (m * unet) for path, value in (("rerun", rerun), ("stored_trajectory", stored))}
    print(f"  one guided UNet call: {unet:.4e} FLOPs per image; VAE decode gradient {decode / m:.4e} per image")
    for path, value in equivalents.items():
        print(f"  {path}: {value:.2f} UNet-forward equivalents per image per denoising step (2 of them the no-gradient pass)")
    return equivalents


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--assets", type=Path, help="tiny assets folder (default: built in a temporary folder)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each side) after the compiling / warm-up one")
    parser.add_argument("--sd15-shapes", action="store_true")
    parser.add_argument("--sd15-lora", choices=("text_encoder", "unet", "both"), default="both",
                        help="with --sd15-shapes: which LoRA configuration(s) to compile (each takes minutes)")
    parser.add_argument("--attention_impl", choices=ATTENTION_IMPLS, default="chunked",
                        help="with --sd15-shapes: the UNet's and VAE's attention kernel ('cudnn' on a GPU)")
    parser.add_argument("--dft_gradient", choices=("stored_trajectory", "rerun"), default="stored_trajectory",
                        help="with --sd15-shapes: the adjusted-DFT gradient path to compile")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch step (scripts/torch_train_step.py)")
    parser.add_argument("--sd15-unet-equivalents", action="store_true",
                        help="count UNet-forward equivalents per image per denoising step of both gradient paths (compile only)")
    args, config_args = parser.parse_known_args(argv[1:])
    if args.sd15_unet_equivalents:
        for part in ("text_encoder", "unet") if args.sd15_lora == "both" else (args.sd15_lora,):
            unet_equivalents(part, attention_impl=args.attention_impl)
        return
    if args.sd15_shapes:
        if args.sd15_lora in ("text_encoder", "both"):
            sd15_memory(True, False, 4, attention_impl=args.attention_impl, dft_gradient=args.dft_gradient)
        if args.sd15_lora in ("unet", "both"):
            sd15_memory(False, True, 3, attention_impl=args.attention_impl, dft_gradient=args.dft_gradient)
        return
    if not any(a.startswith("--config") for a in config_args):
        config_args = ["--config", str(ROOT / "configs" / "tiny.py")] + config_args
    with tempfile.TemporaryDirectory() as tmp:
        if args.assets is None and "tiny.py" in " ".join(config_args):
            from fairdiff_jax.judging.tiny import build_tiny_assets

            args.assets = build_tiny_assets(Path(tmp) / "assets")
        if args.assets is not None:
            config_args.append(f"--config.assets_dir={args.assets}")
        config, _ = config_cli.parse_config_args([argv[0]] + config_args)
        judges_lib.check_asset_files(config)
        benchmark_tiny(config, args.steps, not args.no_torch)


if __name__ == "__main__":
    main()
