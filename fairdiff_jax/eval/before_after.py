"""The original model against the debiased one on the held-out prompts of every kind: generate, evaluate, compare.

    python -m fairdiff_jax.before_after --config configs/miniature.py --out workdirs/miniature/before_after \\
        --text_encoder_lora workdirs/miniature/lora/text_encoder_lora_EMA.pth [--unet_lora ...] \\
        [--images_per_prompt 64] [--config.generate.num_denoising_steps=25 ...]

For each prompt kind (`config.data.prompts_dir/<kind>.json`, its `test_prompts`), with the same initial noise
for both models (`generate.initial_noise`: a function of seed, prompt and image index):
  out/original/<kind>/prompt_i/img_j.jpg   the model of `config.model.sd_path` as it is
  out/debiased/<kind>/...                  the same with the LoRA files merged
  out/eval/{original,debiased}/<kind>/     `fairdiff_jax.eval.evaluate`'s outputs (test_results.pkl, grids, tables)
                                           by the evaluator of `config.eval` (eval/from_config.py); the debiased side
                                           also measures CLIP-I / DINO to the original image of the same seed
  out/before_after_<kind>.png              the first images of each prompt, original | debiased, same seeds
  out/comparison.md                        one row per kind and one over all prompts: bias, fidelity, consistency,
                                           face share before -> after (mean +- std over prompts), how much of
                                           each gap was removed, and the most that a perfectly balanced set with
                                           as many faces could remove (its bias is sampling noise alone)

Fidelity's reference (config.eval.fidelity_reference): 'original' compares the debiased images with the original
model's images of the same prompt (the original side has no fidelity then); 'miniature_world' compares both sides
with the world's balanced renders of the prompt. Sampling follows `config.generate`, `config.model.guidance_scale`
and `config.seed`. Every stage resumes: images on disk are not generated again and evaluation caches per image;
an image folder that another model, LoRA or setting made (its generation.json, sd/manifest.py) is refused before
anything is sampled, unless --overwrite.
"""

import argparse
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from fairdiff_jax import config_checks, config_cli
from fairdiff_jax import prompts as prompt_files
from fairdiff_jax.eval import bias as bias_lib
from fairdiff_jax.eval import evaluate, from_config, grids, tables
from fairdiff_jax.eval.folders import image_files, prompt_folders, read_pixels
from fairdiff_jax.sd import generation as generate
from fairdiff_jax.sd import manifest
from fairdiff_jax.sd.loader import load_stable_diffusion

MODELS = ("original", "debiased")
ALL_PROMPTS = "all held-out prompts"
GRID_IMAGES = 8  # images per prompt in the side-by-side grids


def gap_reduction(before: Mapping[str, tables.MeanStd], after: Mapping[str, tables.MeanStd]) -> dict[str, float]:
    """{bias metric: 1 - after / before} of the mean over prompts: the share of the original's gap removed
    (1 = all of it, 0 = none, negative = the gap grew)."""
    return {name: 1.0 - after[name].mean / before[name].mean
            for name in tables.BIAS_METRICS if name in before and name in after and before[name].mean > 0}


def balanced_floor(rows: Sequence[Mapping[str, float]]) -> dict[str, tables.MeanStd]:
    """`tables.summarize` of each prompt's `bias.balanced_bias` at its face count, per bias metric the rows have: what
    a perfectly balanced generator would measure with the same faces (docs/method.md, "Metrics"); faceless prompts
    are skipped as their bias is."""
    names = [n for n in tables.BIAS_METRICS if rows and n in rows[0]]
    return tables.summarize([{n: bias_lib.balanced_bias(row["num_faces"], tables.bias_num_classes(n)) for n in names}
                             for row in rows])


def reduction_markdown(reductions: Mapping[str, Mapping[str, float]],
                       removable: Optional[Mapping[str, Mapping[str, float]]] = None) -> str:
    """Table of `gap_reduction` per prompt set, in percent; with `removable` (the `gap_reduction` a perfectly
    balanced set would reach: 1 - balanced_floor / before) each cell also says the most that could be removed."""
    names = [n for n in tables.BIAS_METRICS if any(n in r for r in reductions.values())]
    removable = removable or {}
    title = "share of the original's gap removed (1 - after / before, of the means over prompts)"
    if removable:
        title += ("; in brackets the share a perfectly balanced set with the same face counts would remove (its bias is "
                  "sampling noise alone)")
    lines = [title, "", "| prompts | " + " | ".join(tables.METRIC_LABELS[n] for n in names) + " |",
             "|---" * (1 + len(names)) + "|"]
    for set_name, reduction in reductions.items():
        most = removable.get(set_name, {})
        cells = [(f"{100 * reduction[n]:.0f}%" + (f" (of {100 * most[n]:.0f}%)" if n in most else "")) if n in reduction
                 else "–" for n in names]
        lines.append(f"| {set_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def held_out_prompts(prompts_dir: Path, kinds: Sequence[str], per_kind: Optional[int]) -> dict[str, list[str]]:
    """{kind: the first `per_kind` (all when None) test_prompts of prompts_dir/<kind>.json}."""
    return {kind: prompt_files.load_test_prompts(prompts_dir / f"{kind}.json")[:per_kind] for kind in kinds}


def side_by_side(original_dir: Path, debiased_dir: Path, num_images: int) -> np.ndarray:
    """`grids.side_by_side_grid` of the first num_images images of every prompt folder (one row per prompt)."""
    halves = [[read_pixels(image_files(folder)[:num_images]) for folder in prompt_folders(root).values()]
              for root in (original_dir, debiased_dir)]
    return grids.side_by_side_grid(*(np.stack(rows) for rows in halves), labels=MODELS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fairdiff_jax.before_after", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; a rerun resumes)")
    parser.add_argument("--text_encoder_lora", type=Path, help="text-encoder LoRA, the original's .pth format")
    parser.add_argument("--unet_lora", type=Path, help="UNet LoRA, the original's .pth format")
    parser.add_argument("--images_per_prompt", type=int, help="default: config.generate.images_per_prompt")
    parser.add_argument("--prompts_per_kind", type=int, help="only the first N test prompts of each kind (default: all)")
    parser.add_argument("--overwrite", action="store_true",
                        help="regenerate image folders that another model, LoRA or setting made (default: refuse)")
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
        config_checks.check_numbers(config)
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out} is a file, not a folder")
        for flag in ("images_per_prompt", "prompts_per_kind"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        images_per_prompt = args.images_per_prompt or config.generate.images_per_prompt
        if images_per_prompt <= config.eval.fidelity_k:
            raise ValueError(f"--images_per_prompt must exceed config.eval.fidelity_k = {config.eval.fidelity_k}, "
                             f"got {images_per_prompt}")
        prompt_sets = held_out_prompts(Path(config.data.prompts_dir), args.kinds, args.prompts_per_kind)
        from_config.check_eval_assets(config)
        evaluator = from_config.load_evaluator(config, similarity=True)
        original = load_stable_diffusion(config.model.sd_path, jnp.dtype(config.model.dtype),
                                         attention_impl=config.model.attention_impl)
        debiased = generate.load_lora_files(original, args.text_encoder_lora, args.unet_lora)
        files = {MODELS[0]: manifest.ModelFiles(Path(config.model.sd_path), config.model.dtype),
                 MODELS[1]: manifest.ModelFiles(Path(config.model.sd_path), config.model.dtype,
                                                {"text_encoder": args.text_encoder_lora, "unet": args.unet_lora})}
        for kind, texts in prompt_sets.items():  # stale image folders are refused (or cleared) before any sampling
            for model, sd in zip(MODELS, (original, debiased)):
                made_by = manifest.recipe(files[model], seed=config.seed, guidance=config.model.guidance_scale,
                                          steps=config.generate.num_denoising_steps, latent_shape=sd.latent_shape)
                manifest.claim_folder(args.out / model / kind, made_by, texts, args.overwrite)
    except (OSError, ValueError, config_cli.ConfigError) as e:
        parser.error(str(e))

    world_reference = config.eval.fidelity_reference == "miniature_world"
    summaries, floors, rows = {}, {}, {model: [] for model in MODELS}
    for kind, texts in prompt_sets.items():
        evaluations = {}
        references = ({i: from_config.world_reference_features(evaluator, text, config.eval.reference_images_per_prompt,
                                                                config.seed) for i, text in enumerate(texts)}
                      if world_reference else None)
        for model, sd in zip(MODELS, (original, debiased)):
            print(f"== {kind}: {model} model, {len(texts)} prompts x {images_per_prompt} images", file=sys.stderr)
            images = args.out / model / kind
            try:
                generate.generate_images(sd, texts, images, images_per_prompt, config.generate.batch_size,
                                         config.generate.num_denoising_steps, config.model.guidance_scale, config.seed,
                                         model_files=files[model])
            except generate.GenerationError as e:
                parser.exit(1, f"error: {e}\n")
            paired = dict(reference_dir=args.out / MODELS[0] / kind) if model == MODELS[1] else {}
            if model == MODELS[1] and not world_reference:  # fidelity against the original's images
                references = {i: r.features for i, r in evaluations[MODELS[0]].results.items()}
            evaluations[model] = evaluate.evaluate(
                images, args.out / "eval" / model / kind, evaluator, prompt_texts=texts, reference_features=references,
                batch_size=config.generate.batch_size, **paired)
            rows[model] += evaluations[model].per_prompt
        summaries[kind] = tuple(evaluations[model].summary for model in MODELS)
        floors[kind] = balanced_floor(evaluations[MODELS[1]].per_prompt)
        grid = side_by_side(args.out / MODELS[0] / kind, args.out / MODELS[1] / kind, min(GRID_IMAGES, images_per_prompt))
        grids.save_image(grid, args.out / f"before_after_{kind}.png")
    summaries[ALL_PROMPTS] = tuple(tables.summarize(rows[model]) for model in MODELS)
    floors[ALL_PROMPTS] = balanced_floor(rows[MODELS[1]])
    reductions = {name: gap_reduction(*pair) for name, pair in summaries.items()}
    removable = {name: gap_reduction(before, floors[name]) for name, (before, _) in summaries.items()}
    notes = [f"{model}: {line}" for model in MODELS for line in tables.warnings(rows[model])]
    report = "\n".join([tables.comparison_markdown(summaries, MODELS, consistency_name=evaluator.consistency_name),
                        reduction_markdown(reductions, removable), *notes])
    (args.out / "comparison.md").write_text(report + "\n")
    print(report)
    return reductions[ALL_PROMPTS]
