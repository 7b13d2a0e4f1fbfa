"""One measurement of this project on one accelerator; scripts/device_check.sh runs its phases, each in its own
process under its own time limit, then `--summary` merges them.

    bash scripts/device_check.sh --out device_check/          # one GPU: SD v1-5 shapes, ~8 minutes
    bash scripts/device_check.sh --tiny --out /tmp/dc         # the same code paths, tiny models, on the CPU
    python scripts/device_check.py --phase sampling_jax --out /tmp/dc/sampling_jax.json [--tiny]   # one phase

Phases (every network has random weights at the real shapes (scripts/random_models.py): the numbers are time,
memory and FLOPs, nothing about images):
  sampling_jax    this project's jitted sampler: 512x512, 25 DPM-Solver++(2M) steps, guidance 7.5, batch 8,
                  bfloat16 frozen UNet / VAE; images/s after compilation, XLA-counted FLOPs, fraction of peak
  sampling_torch  diffusers' StableDiffusionPipeline at the same settings, float16, PyTorch SDPA attention
  train_step      one debiasing step at the original's batch: 40 images of one prompt, text-encoder LoRA (rank 50),
                  micro-batch 4, 21 denoising steps, on one device; seconds per part, peak device memory
                  (jax memory_stats), XLA's memory analysis of the gradient stage, XLA-counted FLOPs and the
                  fraction of the chip's dense bfloat16 peak (benchmark_train_step.PEAK_FLOPS, by device_kind)
--tiny: tiny models (32x32 images), float32, 2 sampling steps, 4 images, micro-batch 2, 2 denoising steps.

XLA counts a loop body once: FLOPs come as a bracket (loop bodies once .. x the loops' trip counts), and so does
the fraction of peak. On a CPU there is no peak to compare with (null) and the peak memory is the process's
maximum resident set.
"""

import argparse
import json
import os
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmark_train_step's docstring

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # config files import `configs.common`

import random_models  # noqa: E402  (scripts/, on sys.path when a script runs)
from benchmark_train_step import peak_flops, step_flops, step_setup, time_jax_steps  # noqa: E402

from fairdiff_jax import config_cli  # noqa: E402
from fairdiff_jax.training import parallel  # noqa: E402

PHASES = ("sampling_jax", "sampling_torch", "train_step")
GIB = 2**30
SUMMARY_FILE = "device_check.json"

# What each phase runs: (SD v1-5 shapes, --tiny).
SAMPLING = {"batch_size": (8, 2), "steps": (25, 2), "repeats": (3, 2)}
TRAIN = {"images_per_prompt": (40, 4), "micro_batch_size": (4, 2), "generation_batch_size": (8, 2),
         "denoising_steps": (21, 2), "rank": (50, 4), "timed_steps": (2, 1)}
GUIDANCE = 7.5
# Targets of the project (README, Device measurements): one step in 12 s on one H100/H200-class GPU (the original:
# ~23 s on two A100s) and sampling at least 1.3x diffusers' float16 pipeline on the same GPU.
TARGET_STEP_SECONDS = 12.0
TARGET_SAMPLING_RATIO = 1.3


def pick(table: dict, tiny: bool) -> dict:
    return {k: v[1 if tiny else 0] for k, v in table.items()}


def device_info() -> dict:
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind, "jax": jax.__version__}


def fraction_of_peak(flops_per_second: tuple[float, ...], device_kind: str, platform: str) -> list[float] | None:
    """Achieved / dense bfloat16 peak FLOP/s for each end of the bracket; None on a CPU or an unlisted device."""
    peaks = None if platform == "cpu" else peak_flops(device_kind)
    return None if peaks is None else [f / peaks[0] for f in flops_per_second]


def flops_of(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float((analysis or {}).get("flops", float("nan")))


def timed_calls(fn, repeats: int) -> float:
    """Mean seconds of `repeats` calls (fn returns host arrays, so each call has finished when it returns)."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


# ---- phases ------------------------------------------------------------------------------------------------


def sampling_jax(tiny: bool, dtype: str, attention_impl: str) -> dict:
    from benchmark_sampling import jax_sampler

    s = pick(SAMPLING, tiny)
    shapes = random_models.SHAPES["tiny" if tiny else "sd15"]
    sd, _, _ = random_models.random_models(shapes, jnp.dtype(dtype), attention_impl, remat=False, with_judges=False)
    sample, lowered = jax_sampler(sd, s["batch_size"], s["steps"], GUIDANCE)
    started = time.perf_counter()
    compiled = lowered.compile()  # the jitted sampler reuses this executable
    compile_seconds = time.perf_counter() - started
    started = time.perf_counter()
    sample()
    first_call = time.perf_counter() - started
    seconds = timed_calls(sample, s["repeats"])
    flops = flops_of(compiled)
    bracket = (flops, flops * s["steps"])  # the denoising loop's body counted once .. times its trips
    info = device_info()
    return dict(
        info, **s, image_size=sd.image_size, dtype=dtype, attention_impl=attention_impl, compile_seconds=compile_seconds,
        first_call_seconds=first_call, seconds_per_batch=seconds, images_per_second=s["batch_size"] / seconds,
        flops_per_batch=list(bracket),
        fraction_of_bf16_peak=fraction_of_peak(tuple(f / seconds for f in bracket), info["device_kind"], info["platform"]),
    )


def sampling_torch(tiny: bool, dtype: str) -> dict:
    import torch
    from benchmark_sampling import DTYPES, random_pipeline, torch_sampler
    from diffusers.models.attention_processor import AttnProcessor2_0

    s = pick(SAMPLING, tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = DTYPES[dtype][1]
    pipe = random_pipeline(not tiny).to(device, torch_dtype)
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # torch.nn.functional.scaled_dot_product_attention
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    sample = torch_sampler(pipe, s["batch_size"], s["steps"], GUIDANCE)
    started = time.perf_counter()
    sample()
    warm_up = time.perf_counter() - started
    seconds = timed_calls(sample, s["repeats"])
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return dict(
        platform=device, device_kind=name, torch=torch.__version__, **s, dtype=dtype, attention="SDPA (AttnProcessor2_0)",
        warm_up_seconds=warm_up, seconds_per_batch=seconds, images_per_second=s["batch_size"] / seconds,
    )


def train_config(tiny: bool, dtype: str, attention_impl: str):
    t = pick(TRAIN, tiny)
    shapes = random_models.SHAPES["tiny" if tiny else "sd15"]
    overrides = [
        f"model.dtype={dtype}", f"model.attention_impl={attention_impl}", "lora.train_text_encoder=True", "lora.train_unet=False",
        f"lora.rank={t['rank']}", f"train.images_per_prompt={t['images_per_prompt']}",
        f"train.micro_batch_size={t['micro_batch_size']}", f"train.generation_batch_size={t['generation_batch_size']}",
        f"train.min_denoising_steps={t['denoising_steps']}", f"train.max_denoising_steps={t['denoising_steps']}",
        f"loss.img_size_small={shapes.img_size_small}", f"faces.size_face={shapes.size_face}",
        # Random networks find no faces: a fixed central box stands in for the detector so every loss term runs.
        "faces.detector=fairdiff_jax.judging.tiny:CentralFaceDetector",
    ] + (["loss.ot_num_samples=20"] if tiny else [])
    return config_cli.load_config(str(ROOT / "configs" / "debias_text_encoder.py"), overrides), t


def peak_memory() -> tuple[int, str]:
    """(bytes, what they are): the device allocator's peak, or on a CPU the process's maximum resident set."""
    stats = jax.devices()[0].memory_stats()
    if stats and stats.get("peak_bytes_in_use"):
        return int(stats["peak_bytes_in_use"]), "jax memory_stats peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process maximum resident set (no device allocator stats)"


def train_step(tiny: bool, dtype: str, attention_impl: str) -> dict:
    config, t = train_config(tiny, dtype, attention_impl)
    shapes = random_models.SHAPES["tiny" if tiny else "sd15"]
    models = random_models.random_models(shapes, jnp.dtype(dtype), attention_impl, remat=bool(config.model.remat))
    mesh = parallel.make_mesh(jax.devices()[:1])
    stages, jitted_step, frozen, state = step_setup(config, *models, mesh)
    num_steps = t["denoising_steps"]
    seconds, rows, prepared, state = time_jax_steps(stages, jitted_step, state, frozen, num_steps, t["timed_steps"])
    memory_bytes, memory_source = peak_memory()
    flops = step_flops(stages, jitted_step, state, frozen, prepared, num_steps)
    gradient = jitted_step.lower(state, prepared.constants, prepared.batch, jax.random.key(0)).compile()
    analysis = gradient.memory_analysis()
    analysed = None if analysis is None else int(
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes
    )
    info = device_info()
    times = dict(seconds, step=seconds["total"])
    return dict(
        info, **t, dtype=dtype, attention_impl=attention_impl, image_size=stages.sd.image_size, lora="text_encoder",
        dft_gradient=config.train.dft_gradient,
        first_step_seconds=rows[0]["total"], step_seconds=seconds["total"], part_seconds=seconds,
        peak_memory_bytes=memory_bytes, peak_memory_source=memory_source, gradient_stage_memory_analysis_bytes=analysed,
        flops_per_step={part: list(bounds) for part, bounds in flops.items()},
        fraction_of_bf16_peak={
            part: fraction_of_peak(tuple(f / times[part] for f in bounds), info["device_kind"], info["platform"])
            for part, bounds in flops.items()
        },
    )


# ---- summary -------------------------------------------------------------------------------------------


def summarize(folder: Path) -> dict:
    """Merges folder/<phase>.json (a missing or unreadable one counts as failed) into folder/device_check.json."""
    phases = {}
    for phase in PHASES:
        path = folder / f"{phase}.json"
        try:
            phases[phase] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            phases[phase] = {"status": f"no result ({e.__class__.__name__}: {path})"}
    jax_sampling, torch_sampling, step = (phases[p] for p in PHASES)
    ok = lambda result: result.get("status") == "ok"  # noqa: E731
    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": jax_sampling.get("device_kind") or step.get("device_kind"),
        "phases": phases,
        "sampling_ratio_jax_over_diffusers": (
            jax_sampling["images_per_second"] / torch_sampling["images_per_second"]
            if ok(jax_sampling) and ok(torch_sampling) else None
        ),
        "targets": {"step_seconds_at_most": TARGET_STEP_SECONDS, "sampling_ratio_at_least": TARGET_SAMPLING_RATIO},
    }
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(report(summary))
    return summary


def _bracket(values) -> str:
    return "n/a" if values is None else " .. ".join(f"{v:.3g}" for v in dict.fromkeys(values))


def report(summary: dict) -> str:
    jax_sampling, torch_sampling, step = (summary["phases"][p] for p in PHASES)
    lines = [f"device check {summary['date']} on {summary['device']}"]
    for phase in PHASES:
        result = summary["phases"][phase]
        if result.get("status") != "ok":
            lines.append(f"  {phase}: {result.get('status')}")
    if jax_sampling.get("status") == "ok":
        s = jax_sampling
        lines.append(f"  sampling, this project: {s['images_per_second']:.3g} images/s ({s['image_size']} px, {s['steps']} steps, batch "
                     f"{s['batch_size']}, {s['dtype']}, '{s['attention_impl']}' attention; compile {s['compile_seconds']:.0f} s), "
                     f"fraction of bf16 peak {_bracket(s['fraction_of_bf16_peak'])}")
    if torch_sampling.get("status") == "ok":
        lines.append(f"  sampling, diffusers:    {torch_sampling['images_per_second']:.3g} images/s ({torch_sampling['dtype']}, "
                     f"{torch_sampling['attention']})")
    if summary["sampling_ratio_jax_over_diffusers"] is not None:
        lines.append(f"  ratio this project / diffusers: {summary['sampling_ratio_jax_over_diffusers']:.2f} "
                     f"(target >= {TARGET_SAMPLING_RATIO})")
    if step.get("status") == "ok":
        lines.append(f"  training step ({step['images_per_prompt']} images, {step['denoising_steps']} denoising steps, micro-batch "
                     f"{step['micro_batch_size']}, text-encoder LoRA): {step['step_seconds']:.2f} s (target <= {TARGET_STEP_SECONDS:g} s "
                     f"on an H100/H200), first step incl. compile {step['first_step_seconds']:.0f} s")
        lines.append("    parts: " + ", ".join(f"{k} {v:.2f} s" for k, v in step["part_seconds"].items()))
        lines.append(f"    peak memory {step['peak_memory_bytes'] / GIB:.2f} GiB ({step['peak_memory_source']})")
        for part, bounds in step["flops_per_step"].items():
            lines.append(f"    {part:<9} XLA FLOPs {_bracket(bounds)}, fraction of bf16 peak {_bracket(step['fraction_of_bf16_peak'][part])}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=PHASES)
    parser.add_argument("--summary", type=Path, metavar="FOLDER", help="merge FOLDER/<phase>.json into FOLDER/" + SUMMARY_FILE)
    parser.add_argument("--out", type=Path, help="with --phase: the JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="tiny models, float32 (CPU)")
    parser.add_argument("--dtype", help="frozen networks' dtype (default: bfloat16; float16 for diffusers; --tiny: float32)")
    parser.add_argument("--sampling-attention", default="xla", help="the sampler's attention kernel (nn/attention.py)")
    parser.add_argument("--train-attention", default="chunked", help="the training step's UNet / VAE attention kernel")
    args = parser.parse_args(argv)
    if args.summary:
        summarize(args.summary)
        return
    if args.phase is None or args.out is None:
        parser.error("give --phase and --out, or --summary")
    dtype = args.dtype or ("float32" if args.tiny else ("float16" if args.phase == "sampling_torch" else "bfloat16"))
    started = time.perf_counter()
    if args.phase == "sampling_jax":
        result = sampling_jax(args.tiny, dtype, args.sampling_attention)
    elif args.phase == "sampling_torch":
        result = sampling_torch(args.tiny, dtype)
    else:
        result = train_step(args.tiny, dtype, args.train_attention)
    result = dict(status="ok", phase=args.phase, tiny=args.tiny, wall_seconds=time.perf_counter() - started, **result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
