"""The original model against the debiased one on the held-out prompts of every kind: generate, evaluate, compare.

    python -m fairdiff_jax.before_after --config configs/miniature.py --out workdirs/miniature/before_after \\
        --text_encoder_lora workdirs/miniature/lora/text_encoder_lora_EMA.pth [--unet_lora ...] \\
        [--images_per_prompt 64] [--config.generate.num_denoising_steps=25 ...]

For each prompt kind (`config.data.prompts_dir/<kind>.json`, its `test_prompts`), with the same initial noise
for both models (`generate.initial_noise`: a function of seed, prompt and image index):
  out/original/<kind>/prompt_i/img_j.jpg   the model of `config.model.sd_path` as it is
  out/debiased/<kind>/...                  the same with the LoRA files merged
  out/eval/{original,debiased}/<kind>/     `fairdiff_jax.eval.evaluate`'s outputs (test_results.pkl, grids, tables);
                                           the debiased side also measures CLIP-I / DINO similarity to the
                                           original image of the same seed (config.model.clip_vision_path,
                                           config.model.dinov2_path)
  out/comparison.md                        one row per kind and one over all prompts: bias before -> after
                                           (mean +- std over prompts) and how much of each gap was removed

Sampling follows `config.generate` (denoising steps, images per prompt, batch size), `config.model.guidance_scale`
and `config.seed`; faces and test classifiers follow `config.faces` and `config.test_classifiers`. Every stage
resumes: images on disk are not generated again and evaluation caches per image.
"""

import argparse
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import jax.numpy as jnp

from fairdiff_jax import config_cli
from fairdiff_jax import prompts as prompt_files
from fairdiff_jax.eval import evaluate
from fairdiff_jax.judging import judges as judges_lib
from fairdiff_jax.sd import generation as generate
from fairdiff_jax.sd.loader import load_stable_diffusion

MODELS = ("original", "debiased")
ALL_PROMPTS = "all held-out prompts"


def gap_reduction(before: Mapping[str, evaluate.MeanStd], after: Mapping[str, evaluate.MeanStd]) -> dict[str, float]:
    """{bias metric: 1 - after / before} of the mean over prompts: the share of the original's gap removed
    (1 = all of it, 0 = none, negative = the gap grew)."""
    return {name: 1.0 - after[name].mean / before[name].mean
            for name in evaluate.BIAS_METRICS if name in before and name in after and before[name].mean > 0}


def reduction_markdown(reductions: Mapping[str, Mapping[str, float]]) -> str:
    """Table of `gap_reduction` per prompt set, in percent."""
    names = [n for n in evaluate.BIAS_METRICS if any(n in r for r in reductions.values())]
    lines = ["share of the original's gap removed (1 - after / before, of the means over prompts)", "",
             "| prompts | " + " | ".join(evaluate.METRIC_LABELS[n] for n in names) + " |", "|---" * (1 + len(names)) + "|"]
    for set_name, reduction in reductions.items():
        lines.append(f"| {set_name} | " + " | ".join(f"{100 * reduction[n]:.0f}%" if n in reduction else "–" for n in names)
                     + " |")
    return "\n".join(lines) + "\n"


def held_out_prompts(prompts_dir: Path, kinds: Sequence[str], per_kind: Optional[int]) -> dict[str, list[str]]:
    """{kind: the first `per_kind` (all when None) test_prompts of prompts_dir/<kind>.json}."""
    return {kind: prompt_files.load_test_prompts(prompts_dir / f"{kind}.json")[:per_kind] for kind in kinds}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fairdiff_jax.before_after", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; a rerun resumes)")
    parser.add_argument("--text_encoder_lora", type=Path, help="text-encoder LoRA, the original's .pth format")
    parser.add_argument("--unet_lora", type=Path, help="UNet LoRA, the original's .pth format")
    parser.add_argument("--images_per_prompt", type=int, help="default: config.generate.images_per_prompt")
    parser.add_argument("--prompts_per_kind", type=int, help="only the first N test prompts of each kind (default: all)")
    parser.add_argument("--kinds", nargs="+", default=list(prompt_files.PROMPT_KINDS), choices=prompt_files.PROMPT_KINDS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    argv = list(sys.argv if argv is None else ["before_after", *argv])
    parser = build_parser()
    args, config_args = parser.parse_known_args(argv[1:])
    # Everything read from disk is checked before anything compiles; errors are one line.
    try:
        config, positional = config_cli.parse_config_args([argv[0]] + config_args)
        if positional:
            raise ValueError(f"unexpected arguments: {positional}")
        if args.text_encoder_lora is None and args.unet_lora is None:
            raise ValueError("give --text_encoder_lora and/or --unet_lora (the debiased model)")
        images_per_prompt = args.images_per_prompt or config.generate.images_per_prompt
        if images_per_prompt < 1:
            raise ValueError(f"--images_per_prompt must be >= 1, got {images_per_prompt}")
        prompt_sets = held_out_prompts(Path(config.data.prompts_dir), args.kinds, args.prompts_per_kind)
        tests = config.test_classifiers
        classifiers = evaluate.load_classifiers(tests.gender, tests.race, tests.age)
        dino = Path(config.model.dinov2_path)
        similarity_nets = evaluate.load_similarity_nets(  # DINOv2 at the training loss's image size
            config.model.clip_vision_path, dino if dino.is_dir() else None, None if dino.is_dir() else dino,
            config.loss.img_size_small)
        detector = judges_lib.make_detector(config)
        original = load_stable_diffusion(config.model.sd_path, jnp.dtype(config.model.dtype),
                                         attention_impl=config.model.attention_impl)
        debiased = generate.load_lora_files(original, args.text_encoder_lora, args.unet_lora)
    except (OSError, ValueError, config_cli.ConfigError) as e:
        parser.error(str(e))

    detector_name = " ".join(str(part) for part in judges_lib.detector_spec(config)[:2])
    summaries, rows = {}, {model: [] for model in MODELS}
    for kind, texts in prompt_sets.items():
        evaluations = {}
        for model, sd in zip(MODELS, (original, debiased)):
            print(f"== {kind}: {model} model, {len(texts)} prompts x {images_per_prompt} images", file=sys.stderr)
            images = args.out / model / kind
            generate.generate_images(sd, texts, images, images_per_prompt, config.generate.batch_size,
                                     config.generate.num_denoising_steps, config.model.guidance_scale, config.seed)
            reference = dict(reference_dir=args.out / MODELS[0] / kind, similarity_nets=similarity_nets) if model == MODELS[1] else {}
            evaluations[model] = evaluate.evaluate(
                images, args.out / "eval" / model / kind, classifiers, detector, prompt_texts=texts,
                expand_coef=config.faces.expand_coef, face_size=config.faces.size_face,
                batch_size=config.generate.batch_size, detector_name=detector_name, **reference)
            rows[model] += evaluations[model].per_prompt
        summaries[kind] = tuple(evaluations[model].summary for model in MODELS)
    summaries[ALL_PROMPTS] = tuple(evaluate.summarize(rows[model]) for model in MODELS)
    reductions = {name: gap_reduction(*pair) for name, pair in summaries.items()}
    report = evaluate.comparison_markdown(summaries, MODELS) + "\n" + reduction_markdown(reductions)
    (args.out / "comparison.md").write_text(report)
    print(report)
    return reductions[ALL_PROMPTS]
