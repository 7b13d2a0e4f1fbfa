"""`python -m fairdiff_jax.evaluate`: measure a folder of generated images (eval/evaluate.py writes the outputs).

    python -m fairdiff_jax.evaluate --images out/sd15 --out out/sd15_results \\
        --gender_classifier gender.pt --race_classifier race.pt --age_classifier age.pt \\
        --prompts fairdiff_jax/data/prompts/occupation.json \\
        [--reference out/sd15_original --clip_vision CLIP-ViT-H-14/ --dinov2 dinov2-base/] \\
        [--fidelity_features dinov2 --reference_set out/sd15_original] [--consistency clip_t --clip_model CLIP-ViT-H-14/]

Beside the bias: the face share by --detector (an evaluation detector should reject non-faces); fidelity
(improved precision / recall, k = --fidelity_k) in the space of --fidelity_features against --reference_set
(a folder of the same layout, e.g. the original model's images) or, in the miniature world, against the
world's balanced renders of each prompt (--miniature_reference); prompt consistency (--consistency: CLIP-T of a
CLIPModel folder, or the miniature scene classifier's accuracy); CLIP-I / DINO to --reference (paired images of
the same seeds). Degenerate images (not finite or of one colour) count as images without a face, with a warning.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from fairdiff_jax import prompts as prompt_files
from fairdiff_jax.eval import tables
from fairdiff_jax.eval.consistency import ClipTextConsistency, SceneConsistency
from fairdiff_jax.eval.evaluate import Evaluation, evaluate, folder_features
from fairdiff_jax.eval.evaluator import Evaluator
from fairdiff_jax.eval.face_analysis import load_test_classifiers
from fairdiff_jax.eval.from_config import detector_id, world_reference_features
from fairdiff_jax.eval.folders import prompt_folders
from fairdiff_jax.eval.similarity import SimilarityNets, clip_tower, dino_tower, scene_tower
from fairdiff_jax.judging import scene_classifier as scene_lib
from fairdiff_jax.judging.detection import DETECTORS, make_detector
from fairdiff_jax.miniature import reference as world_reference


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fairdiff_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, required=True, help="generate's output folder: prompt_i/img_j.jpg")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--gender_classifier", type=Path, required=True, help="mobilenet_v3_large state dict, 2 classes")
    parser.add_argument("--race_classifier", type=Path, required=True, help="mobilenet_v3_large state dict, 4 classes")
    parser.add_argument("--age_classifier", type=Path, required=True, help="mobilenet_v3_large state dict, 2 classes")
    parser.add_argument("--detector", default="mtcnn",
                        help=f"face detector: one of {', '.join(sorted(DETECTORS))}, or 'package.module:callable'")
    parser.add_argument("--detector_path", type=Path, help="file passed to the --detector callable (its weights)")
    parser.add_argument("--expand_coef", type=float, default=0.5, help="face box expansion before the square crop")
    parser.add_argument("--face_size", type=int, default=224, help="face chip size fed to the classifiers")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--grid_images", type=int, default=64, help="images per annotated grid (0: no grids)")
    parser.add_argument("--prompts", type=Path, help="JSON prompt file whose test_prompts the images were made from")
    parser.add_argument("--reference", type=Path, help="the original model's images for the same seeds, same layout (CLIP-I, DINO)")
    parser.add_argument("--clip_vision", type=Path, help="CLIP vision folder (transformers) for CLIP-I / clip fidelity features")
    dino = parser.add_mutually_exclusive_group()
    dino.add_argument("--dinov2", type=Path, help="DINOv2 folder (transformers) for DINO / dinov2 fidelity features")
    dino.add_argument("--dinov2_hub", type=Path, help="torch-hub DINOv2 ViT-B/14 .pth file instead of --dinov2")
    parser.add_argument("--dino_input_size", type=int, default=224, help="image size DINOv2 sees (a multiple of its patch)")
    parser.add_argument("--fidelity_features", choices=("dinov2", "clip", "scene_classifier"),
                        help="feature space of fidelity (needs --dinov2, --clip_vision or --scene_classifier)")
    references = parser.add_mutually_exclusive_group()
    references.add_argument("--reference_set", type=Path, help="fidelity's reference images, same prompt_i layout")
    references.add_argument("--miniature_reference", action="store_true",
                            help="fidelity's reference: the miniature world's balanced renders of each prompt (needs --prompts)")
    parser.add_argument("--reference_images_per_prompt", type=int, default=64, help="renders per prompt (--miniature_reference)")
    parser.add_argument("--fidelity_k", type=int, default=3, help="k of the k-NN radii of improved precision / recall")
    parser.add_argument("--consistency", choices=("clip_t", "scene_classifier"),
                        help="prompt consistency: CLIP-T (--clip_model) or the scene classifier's accuracy (--scene_classifier)")
    parser.add_argument("--clip_model", type=Path, help="transformers CLIPModel folder (both towers, tokenizer) for CLIP-T")
    parser.add_argument("--scene_classifier", type=Path, help="miniature scene classifier .pt (its .json beside it)")
    return parser


def _need(args, flag: str, what: str) -> None:
    if getattr(args, flag) in (None, False):
        raise ValueError(f"{what} needs --{flag}")


def check_arguments(args: argparse.Namespace) -> None:
    """Every path argument and number, before anything is loaded; errors name the flag and the path."""
    for flag in ("batch_size", "face_size", "fidelity_k"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder")
    if not args.images.is_dir():
        raise FileNotFoundError(f"--images: folder not found: {args.images}")
    if not prompt_folders(args.images):
        raise FileNotFoundError(f"--images: no prompt_<i> folders in {args.images}")
    for flag in ("gender_classifier", "race_classifier", "age_classifier", "prompts", "dinov2_hub", "detector_path",
                 "scene_classifier"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"--{flag}: file not found: {path}")
    for flag in ("reference", "clip_vision", "dinov2", "reference_set", "clip_model"):
        path = getattr(args, flag)
        if path is not None and not path.is_dir():
            raise FileNotFoundError(f"--{flag}: folder not found: {path}")
    if args.reference is not None and args.clip_vision is None and args.dinov2 is None and args.dinov2_hub is None:
        raise ValueError("--reference needs --clip_vision and/or --dinov2 (or --dinov2_hub)")
    if args.fidelity_features is not None:
        if args.reference_set is None and not args.miniature_reference:
            raise ValueError("--fidelity_features needs --reference_set or --miniature_reference")
        flag = {"dinov2": "dinov2_hub" if args.dinov2_hub else "dinov2", "clip": "clip_vision",
                "scene_classifier": "scene_classifier"}[args.fidelity_features]
        _need(args, flag, f"--fidelity_features {args.fidelity_features}")
    elif args.reference_set is not None or args.miniature_reference:
        raise ValueError("--reference_set / --miniature_reference need --fidelity_features")
    if args.consistency is not None:
        _need(args, "prompts", f"--consistency {args.consistency}")
        _need(args, "clip_model" if args.consistency == "clip_t" else "scene_classifier", f"--consistency {args.consistency}")
    if args.miniature_reference:
        _need(args, "prompts", "--miniature_reference")


def build_evaluator(args: argparse.Namespace) -> Evaluator:
    """The Evaluator the flags describe (loads every network)."""
    classifiers = load_test_classifiers(args.gender_classifier, args.race_classifier, args.age_classifier)
    dino_path = args.dinov2 or args.dinov2_hub
    nets = SimilarityNets(clip_tower(args.clip_vision) if args.clip_vision else None,
                          dino_tower(dino_path, args.dino_input_size) if dino_path else None)
    scene = scene_lib.load_scene_classifier(args.scene_classifier) if args.scene_classifier else None
    fidelity_tower = {None: None, "dinov2": nets.dino, "clip": nets.clip,
                      "scene_classifier": scene_tower(*scene) if scene else None}[args.fidelity_features]
    consistency = {None: lambda: None, "clip_t": lambda: ClipTextConsistency(args.clip_model),
                   "scene_classifier": lambda: SceneConsistency(*scene)}[args.consistency]()
    detector_path = str(args.detector_path) if args.detector_path else None
    return Evaluator(make_detector(args.detector, detector_path), detector_id(args.detector, detector_path), classifiers,
                     args.expand_coef, args.face_size, fidelity_tower, args.fidelity_k, consistency,
                     nets if args.reference else SimilarityNets())


def main(argv: Optional[Sequence[str]] = None) -> Evaluation:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Inputs are checked and loaded before anything compiles; their errors are one line, no traceback.
    try:
        check_arguments(args)
        prompt_texts = prompt_files.load_test_prompts(args.prompts) if args.prompts else None
        if prompt_texts is not None and max(prompt_folders(args.images)) >= len(prompt_texts):
            raise ValueError(f"--prompts {args.prompts} has {len(prompt_texts)} test_prompts, but {args.images} "
                             f"has prompt_{max(prompt_folders(args.images))}")
        if args.miniature_reference:
            for text in prompt_texts:
                world_reference.class_prompt(text, 0, 0)  # a prompt the world cannot balance fails here
        evaluator = build_evaluator(args)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    reference_features = None
    if args.reference_set is not None:
        reference_features = folder_features(args.reference_set, evaluator, args.out / "cache", args.batch_size)
    elif args.miniature_reference:
        reference_features = {i: world_reference_features(evaluator, prompt_texts[i], args.reference_images_per_prompt)
                              for i in prompt_folders(args.images)}
    evaluation = evaluate(args.images, args.out, evaluator, prompt_texts=prompt_texts, reference_dir=args.reference,
                          reference_features=reference_features, batch_size=args.batch_size, grid_images=args.grid_images)
    print(tables.summary_markdown(evaluation.summary, f"{args.images}: summary over {len(evaluation.per_prompt)} prompts",
                                  evaluator.consistency_name, tables.warnings(evaluation.per_prompt)))
    print(f"results in {args.out}", file=sys.stderr)
    return evaluation
