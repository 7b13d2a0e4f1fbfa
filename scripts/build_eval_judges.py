"""Builds the miniature world's evaluation judges into an existing assets folder (one that
scripts/build_miniature.py wrote: its sd/vae/ is read, its manifest.json gets an "eval_judges" key).

    .venv/bin/python scripts/build_eval_judges.py --out assets/miniature

Writes under --out:
    eval_detector.safetensors   fairdiff_jax.miniature.detector.DetectorNet params (float16), trained with hard
                                negatives (every ruin of fairdiff_jax/eval/ruins.py, plain and VAE-decoded, and
                                face-less scenes); its threshold, chosen on held-out data, in the metadata
    scene_classifier.pt         torchvision mobilenet_v3_large(width_mult=0.25) state dict (float16), heads
    scene_classifier.json       subject / style / context, each with a "(no scene)" class for ruined images

Every image set (training, calibration, measurement) is `eval_judges.judge_dataset`: 40% the world's mix, 60%
every style x context combination in equal shares. Both judges see other seeds and other data draws than the training detector and classifiers. The numbers
printed at the end (recall and false-positive rate per image set, scene accuracy per head) are measured on
held-out renders, their VAE reconstructions and their ruins, with the stored (float16) weights, and written
to manifest.json. Deterministic for a given seed and thread count.
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_miniature as bm  # noqa: E402  (the world build's torch helpers: VAE round trip, classifier training)

from fairdiff_jax.eval import ruins  # noqa: E402
from fairdiff_jax.judging import scene_classifier as scene_lib  # noqa: E402
from fairdiff_jax.miniature import detector as detector_lib  # noqa: E402
from fairdiff_jax.miniature import drawing, eval_judges, world  # noqa: E402

DETECTOR_FILE = "eval_detector.safetensors"
SCENE_FILE = "scene_classifier.pt"


def load_vae(out: Path):
    """The world's AutoencoderKL (float32, eval) from out/sd/vae."""
    from diffusers import AutoencoderKL

    folder = out / "sd" / "vae"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: build the world first (scripts/build_miniature.py --out {out})")
    return AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval()


def vae_images(vae, images: np.ndarray) -> np.ndarray:
    """Images [N, S, S, 3] after a VAE round trip (what the generator's decoder makes of them)."""
    return bm.decoded(vae, eval_judges.without_faces(images)).images


# A blurred face after the VAE round trip is a face again: the decoder redraws eyes and mouth on the coarse layout
# the blur keeps (look at a few). It is measured but neither a training negative nor a calibration negative.
REDRAWN_BY_THE_DECODER = "blurred (VAE)"


def vae_ruins(vae, ruined: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """VAE round trips of `ruined` ([N, S, S, 3], ruin kind index [N] from `eval_judges.ruin_negatives`), except the
    blurred ones (REDRAWN_BY_THE_DECODER): training negatives that look like what the generator's decoder draws."""
    return vae_images(vae, ruined[kind != list(ruins.RUINS).index("blurred")])


def ruin_sets(vae, images: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """{kind: every image ruined by it, "<kind> (VAE)": the same after a VAE round trip}, for measuring."""
    sets = {}
    for k, (name, ruin) in enumerate(ruins.RUINS.items()):
        ruined = ruin(images, np.random.default_rng([seed, k]))
        sets[name], sets[f"{name} (VAE)"] = ruined, vae_images(vae, ruined)
    return sets


def detector_held_out(vae, data_seed: int, num_faces: int = 600, num_negatives: int = 300
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Held-out detector data drawn from `data_seed`: ({"renders", "renders (VAE)"}: num_faces face images each,
    {"scenes": face-less scenes, every `ruin_sets` kind}: num_negatives non-face images each)."""
    _, renders = eval_judges.judge_dataset(num_faces, data_seed)
    positives = {"renders": renders.images, "renders (VAE)": vae_images(vae, renders.images)}
    negatives = {"scenes": eval_judges.judge_dataset(num_negatives, data_seed + 1, with_faces=False)[1].images,
                 **ruin_sets(vae, eval_judges.judge_dataset(num_negatives, data_seed + 2)[1].images, data_seed + 3)}
    return positives, negatives


def build_detector(out: Path, vae, seed: int, num_images: int, steps: int, log, file_name: str = DETECTOR_FILE,
                   max_false_positive_rate: float = 0.01) -> dict:
    """Trains, calibrates (`eval_judges.choose_threshold` with `max_false_positive_rate` per negative kind), saves (as
    out/file_name) and measures a detector with hard negatives; returns its manifest entry. The evaluation detector
    and the training detector (scripts/build_guardrails.py) are this detector from other seeds."""
    _, faces = eval_judges.judge_dataset(num_images, seed)
    faces = drawing.concatenate([faces, bm.decoded(vae, bm.first(faces, num_images // 2))])
    backgrounds = eval_judges.judge_dataset(num_images // 4, seed + 1, with_faces=False)[1]
    _, to_ruin = eval_judges.judge_dataset(num_images // 2, seed + 2)
    ruined, kind = eval_judges.ruin_negatives(np.concatenate([to_ruin.images, backgrounds.images[: num_images // 8]]), seed + 3)
    negatives = np.concatenate([ruined, vae_ruins(vae, ruined[::2], kind[::2])])
    log(f"{file_name} data: {len(faces.images)} faces, {len(backgrounds.images)} scenes, {len(negatives)} ruins")
    params = detector_lib.train_detector(
        drawing.concatenate([faces, backgrounds, eval_judges.without_faces(negatives)]), steps, seed=seed + 4, log=log)
    params = jax.tree.map(lambda p: np.asarray(p, np.float16).astype(np.float32), params)  # what the file holds
    detector = detector_lib.MiniatureFaceDetector(params, world.IMAGE_SIZE)

    positives, negatives = detector_held_out(vae, seed + 10)
    threshold = eval_judges.choose_threshold(
        np.concatenate([detector.face_probability(x) for x in positives.values()]),
        {name: detector.face_probability(x) for name, x in negatives.items() if name != REDRAWN_BY_THE_DECODER},
        max_false_positive_rate)
    log(f"{file_name} threshold {threshold:.4f} (chosen on held-out set A)")
    detector_lib.save_detector(params, world.IMAGE_SIZE, out / file_name, threshold=threshold, dtype=np.float16)
    detector = detector_lib.MiniatureFaceDetector.from_file(out / file_name)
    positives, negatives = detector_held_out(vae, seed + 20)
    report = eval_judges.detector_report(detector.face_probability, detector.threshold, positives, negatives)
    return {"threshold": round(threshold, 4), "held_out": report}


def build_scene_classifier(out: Path, vae, seed: int, num_images: int, steps: int, log) -> dict:
    """Trains, saves and measures the scene classifier; returns its manifest entry."""
    prompts, renders = eval_judges.judge_dataset(num_images, seed)
    half = num_images // 2
    images = np.concatenate([renders.images, vae_images(vae, renders.images[:half])])
    labels = eval_judges.scene_labels(prompts + prompts[:half])
    ruined, kind = eval_judges.ruin_negatives(eval_judges.judge_dataset(num_images // 4, seed + 1)[1].images, seed + 2)
    ruined = np.concatenate([ruined, vae_ruins(vae, ruined[::2], kind[::2])])
    images = np.concatenate([images, ruined]).astype(np.float16)
    labels = {h: np.concatenate([labels[h], eval_judges.no_scene_labels(len(ruined))[h]]) for h in labels}
    log(f"scene classifier data: {len(images) - len(ruined)} renders, {len(ruined)} ruins")
    heads = [(name, len(classes)) for name, classes in eval_judges.SCENE_HEADS]
    model = bm.train_mobilenet(images, labels, heads, steps, seed + 3, log)
    del images
    torch.save(bm.stored_state_dict(model), out / SCENE_FILE)
    spec = {"heads": [[name, list(classes)] for name, classes in eval_judges.SCENE_HEADS], "image_size": world.IMAGE_SIZE}
    scene_lib.heads_file(out / SCENE_FILE).write_text(json.dumps(spec, indent=1) + "\n")

    scene, variables = scene_lib.load_scene_classifier(out / SCENE_FILE)
    logits = jax.jit(lambda v, x: {h: l.argmax(-1) for h, l in scene_lib.scene_logits(scene, v, x).items()})
    predict = lambda x: {h: np.concatenate([np.asarray(logits(variables, x[s:s + 500])[h]) for s in range(0, len(x), 500)])  # noqa: E731
                         for h, _ in eval_judges.SCENE_HEADS}
    held_prompts, held = eval_judges.judge_dataset(1000, seed + 10)
    held_labels = eval_judges.scene_labels(held_prompts)
    report = {"renders": eval_judges.scene_report(predict, held.images, held_labels),
              "renders (VAE)": eval_judges.scene_report(predict, vae_images(vae, held.images), held_labels)}
    # On ruins: the share that still names the source image's scene (should be near none), and the share called
    # "(no scene)" by every head.
    ruin_labels = {h: v[:300] for h, v in held_labels.items()}
    no_scene = eval_judges.no_scene_labels(300)
    for name, ruined in ruin_sets(vae, held.images[:300], seed + 11).items():
        report[name] = {"true_scene": eval_judges.scene_report(predict, ruined, ruin_labels),
                        "no_scene": eval_judges.scene_report(predict, ruined, no_scene)["all"]}
    return {"heads": {name: len(classes) for name, classes in eval_judges.SCENE_HEADS}, "held_out": report}


def build(out: Path, seed: int, detector_images: int, detector_steps: int, scene_images: int, scene_steps: int,
          judges: tuple[str, ...] = ("eval_detector", "scene_classifier")) -> dict:
    """Builds `judges` (either or both: two processes can build one each) and records them in manifest.json."""
    log = bm.Log()
    vae = load_vae(out)
    entry = {"seed": seed, "torch_threads": torch.get_num_threads()}
    builders = {"eval_detector": lambda: build_detector(out, vae, seed + 500, detector_images, detector_steps, log),
                "scene_classifier": lambda: build_scene_classifier(out, vae, seed + 600, scene_images, scene_steps, log)}
    for name in judges:
        began = bm.now()
        entry[name] = builders[name]()
        log(f"{name}: {json.dumps(entry[name])}")
        log.stage(name, began)
    entry["timings_s"] = log.stages
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.setdefault("eval_judges", {}).update({k: v for k, v in entry.items() if k != "timings_s"})
    manifest["eval_judges"].setdefault("timings_s", {}).update(entry["timings_s"])
    manifest.setdefault("config", {}).update({"eval_detector_path": DETECTOR_FILE, "scene_classifier_path": SCENE_FILE})
    manifest["files"] = bm.file_sizes(out)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("assets/miniature"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--detector_images", type=int, default=4000, help="face renders (half also VAE-decoded)")
    parser.add_argument("--detector_steps", type=int, default=800)
    parser.add_argument("--scene_images", type=int, default=6000, help="renders (half also VAE-decoded)")
    parser.add_argument("--scene_steps", type=int, default=2500)
    parser.add_argument("--judges", nargs="+", choices=("eval_detector", "scene_classifier"),
                        default=("eval_detector", "scene_classifier"), help="which judges to build (default: both)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    build(args.out, args.seed, args.detector_images, args.detector_steps, args.scene_images, args.scene_steps,
          tuple(args.judges))


if __name__ == "__main__":
    main()
