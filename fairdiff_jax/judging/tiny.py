"""Tiny random-weight assets for every file a training config names, for tests, demos and benchmarks.

    python -m fairdiff_jax.judging.tiny /tmp/tiny_assets     # builds them, prints the config overrides
    python -m fairdiff_jax.train --config configs/tiny.py --config.assets_dir=/tmp/tiny_assets --workdir /tmp/run

Layout under the folder (the names configs/tiny.py expects):
    sd/                         tiny_sd.build_tiny_sd (32x32 images, 16x16x4 latents)
    classifier.pt               torchvision mobilenet_v3_large(width_mult=0.25): head Linear(320, 6) (the original's:
                                width 1, Linear(1280, 6)), random, torch.save(state_dict)
    sfnet.pth                   SFNet-20 "deprecated" (no BatchNorm), stages 8/16/32/64 wide, 64-d features (the original's:
                                64..512, 512-d), random weights, keys `module.`-prefixed
    face_feats.pkl              face bank: the original's 5-tuple (feats [64, 64], genders, gender logits, races, race logits)
    clip_vision/                transformers CLIPVisionModelWithProjection (width 32, 2 layers, 28 px, patch 7)
    dinov2/                     transformers Dinov2Model (width 32, 2 layers, patch 7)
    test_classifiers/           gender.pt, race.pt, age.pt: the classifier's family with heads 2, 4, 2 (evaluation)
    clip/                       transformers CLIPModel (both towers, width 32) with the tiny SD's tokenizer (CLIP-T)

`build_scene_classifier` writes a random stand-in of the miniature world's scene classifier (.pt + .json).

The classifier and SFNet keep the original's layouts at reduced widths (the loaders read the widths from the
files) so that building, loading and running them stays fast. Random networks find no faces;
`CentralFaceDetector` stands in for a detector so that every loss term runs.
Same seed, same files.
"""

import argparse
import json
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from fairdiff_jax import attributes
from fairdiff_jax.judging import crops, detection, scene_classifier
from fairdiff_jax.sd.tiny import build_tiny_sd

CLIP_VISION_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7,
    projection_dim=24, hidden_act="gelu",
)
DINOV2_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=7, image_size=7 * 37, mlp_ratio=4)
FACE_BANK_SIZE = 64
CLASSIFIER_WIDTH_MULT = 0.25
SFNET_WIDTHS = (8, 16, 32, 64)  # the original's: 64, 128, 256, 512
FEATURE_DIM = 64  # the original's: 512


def build_classifier(path: Path, seed: int, num_classes: int = 6) -> Path:
    """A random torchvision mobilenet_v3_large (width_mult CLASSIFIER_WIDTH_MULT) with a `num_classes` head and
    BatchNorm statistics of its own (so the converted running stats are exercised), saved as a state dict."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v3_large(num_classes=num_classes, width_mult=CLASSIFIER_WIDTH_MULT)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.momentum = 1.0  # the calibration pass below sets the running statistics
        # torchvision's init shrinks the signal at every depthwise conv, which a trained net's BatchNorm
        # statistics undo: statistics from one pass over random chips, and a head scaled to decisive logits,
        # give input-dependent, confident predictions (near-uniform ones would make every OT target uncertain
        # and leave the fairness terms unexercised).
        model.train()(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
        model.classifier[3].weight.mul_(10.0)
    torch.save(model.eval().state_dict(), path)
    return path


def build_sfnet(path: Path, seed: int) -> Path:
    """A random SFNet-20 ("sfnet20_deprecated": convs with bias, no BatchNorm) with SFNET_WIDTHS stages and
    FEATURE_DIM features, as nn.DataParallel saves it (`module.layer{s}.{b}.conv{1,2}.weight|bias`,
    `module.fc.weight|bias`). He-normal convs, so features do not vanish through the 20 layers."""
    import torch

    rng = np.random.default_rng(seed)
    state = {}
    in_channels = 3
    for stage, (width, blocks) in enumerate(zip(SFNET_WIDTHS, (1, 2, 4, 1)), start=1):
        convs = [(f"layer{stage}.0.conv1", in_channels, width)]
        for block in range(1, blocks + 1):
            convs += [(f"layer{stage}.{block}.conv1", width, width), (f"layer{stage}.{block}.conv2", width, width)]
        for name, c_in, c_out in convs:
            std = np.sqrt(2.0 / (9 * c_in)) * (0.5 if name.endswith("conv2") else 1.0)
            state[f"module.{name}.weight"] = rng.normal(0.0, std, (c_out, c_in, 3, 3))
            state[f"module.{name}.bias"] = np.zeros(c_out)
        in_channels = width
    state["module.fc.weight"] = rng.normal(0.0, np.sqrt(1.0 / (in_channels * 49)), (FEATURE_DIM, in_channels * 49))
    state["module.fc.bias"] = np.zeros(FEATURE_DIM)
    torch.save({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}, path)
    return path


def build_face_bank(path: Path, seed: int) -> Path:
    """The original's pickle layout with random unit features and random labels/logits (numpy arrays)."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(FACE_BANK_SIZE, FEATURE_DIM)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    content = (
        feats,
        rng.integers(0, 2, FACE_BANK_SIZE),
        rng.normal(size=(FACE_BANK_SIZE, 2)).astype(np.float32),
        rng.integers(0, 4, FACE_BANK_SIZE),
        rng.normal(size=(FACE_BANK_SIZE, 4)).astype(np.float32),
    )
    with open(path, "wb") as f:
        pickle.dump(content, f)
    return path


def build_clip_vision(folder: Path, seed: int) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**CLIP_VISION_CONFIG)).save_pretrained(folder)
    return folder


def build_dinov2(folder: Path, seed: int) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    transformers.Dinov2Model(transformers.Dinov2Config(**DINOV2_CONFIG)).save_pretrained(folder)
    return folder


def build_clip_model(folder: Path, seed: int) -> Path:
    """A random transformers CLIPModel (CLIP_VISION_CONFIG's vision tower, a text tower of the same width) with the
    tiny SD's offline tokenizer saved beside it: what CLIP-T reads."""
    import torch
    import transformers

    from fairdiff_jax.sd.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    text_config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config=text_config, vision_config=CLIP_VISION_CONFIG,
                                     projection_dim=CLIP_VISION_CONFIG["projection_dim"])
    transformers.CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_scene_classifier(path: Path, seed: int, heads: Sequence[tuple[str, Sequence[str]]], image_size: int = 32) -> Path:
    """A random stand-in scene classifier: `build_classifier` with one logit per class of `heads`
    ((name, class names), ...), and the JSON beside it that `judging.scene_classifier` reads."""
    build_classifier(path, seed, num_classes=sum(len(classes) for _, classes in heads))
    spec = {"heads": [[name, list(classes)] for name, classes in heads], "image_size": image_size}
    scene_classifier.heads_file(path).write_text(json.dumps(spec))
    return path


def build_tiny_assets(folder: str | Path, seed: int = 0) -> Path:
    """Writes every tiny asset (layout in the module docstring) under `folder`; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_sd(folder / "sd", seed)
    build_classifier(folder / "classifier.pt", seed + 10)
    build_sfnet(folder / "sfnet.pth", seed + 11)
    build_face_bank(folder / "face_feats.pkl", seed + 12)
    build_clip_vision(folder / "clip_vision", seed + 13)
    build_dinov2(folder / "dinov2", seed + 14)
    (folder / "test_classifiers").mkdir(exist_ok=True)
    for offset, (name, num_classes) in enumerate(attributes.TEST_CLASSIFIER_HEADS):
        build_classifier(folder / "test_classifiers" / f"{name}.pt", seed + 15 + offset, num_classes)
    build_clip_model(folder / "clip", seed + 18)
    return folder


# Landmarks of a frontal face in a unit box (x, y): eyes, nose, mouth corners (ArcFace template / 112).
_UNIT_LANDMARKS = crops.ARCFACE_TEMPLATE_112 / 112.0


class CentralFaceDetector:
    """A stand-in `detection.FaceDetector` for random-weight generators, a pure function of each image:
    the face is a centred box covering `box_fraction` of the side with template landmarks inside; it is
    "found" where the left half of the image is on average at least as bright as the right half (so that a
    batch of random images usually holds images with and without a face and both code paths run)."""

    def __init__(self, box_fraction: float = 0.5):
        self.box_fraction = box_fraction

    def detect(self, images: np.ndarray) -> detection.FaceDetections:
        images = np.asarray(images, np.float32)
        n, height, width = images.shape[:3]
        found = images[:, :, : width // 2].mean(axis=(1, 2, 3)) >= images[:, :, width // 2 :].mean(axis=(1, 2, 3))
        side = self.box_fraction * min(height, width)
        x1, y1 = (width - side) / 2, (height - side) / 2
        box = np.array([x1, y1, x1 + side, y1 + side], np.float32)
        landmarks = (np.array([x1, y1]) + side * _UNIT_LANDMARKS).astype(np.float32)
        return detection.FaceDetections(
            found=found,
            boxes=np.where(found[:, None], box, -1).astype(np.float32),
            landmarks=np.where(found[:, None, None], landmarks, -1).astype(np.float32),
            confidence=np.where(found, 0.99, -1).astype(np.float32),
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = build_tiny_assets(args.folder, args.seed)
    print(f"--config.assets_dir={folder}")


if __name__ == "__main__":
    main()
