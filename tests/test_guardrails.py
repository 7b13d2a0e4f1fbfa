"""The debiasing loss's guardrails in the miniature world (assets/miniature, scripts/build_guardrails.py), through the
project's JAX loaders: each ranks a ruined image below the real one. The similarity towers put an image's ruins
(every kind of eval/ruins.py and a wiped face) further from it than its VAE reconstruction; the face feature net puts
ruined faces further from the face bank than real faces; the training detector, at the threshold stored in its file
(which the training path reads), finds the renders and rejects the ruins. Also the ruins and variants they learn from.
The three tests on the held-out scenes are slow (CI runs them in its slow pass); the rest are in the default suite.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairdiff_jax import config_cli
from fairdiff_jax.judging import clip_vision, dinov2, face_bank, judges, sfnet
from fairdiff_jax.miniature import detector as detector_lib
from fairdiff_jax.miniature import eval_judges, guardrail_data, world

ROOT = Path(__file__).resolve().parents[1]
MINIATURE = ROOT / "assets" / "miniature"
NUM_SCENES = 48
SEED = 31337  # no build draws from it


@pytest.fixture(scope="module")
def scenes():
    """Held-out scenes with their variants, their VAE reconstructions and every ruin kind of them."""
    import torch
    from diffusers import AutoencoderKL

    prompts = eval_judges.judge_prompts(NUM_SCENES, np.random.default_rng(SEED))
    variants = guardrail_data.scene_variants(prompts, SEED + 1)
    images = variants.image.images
    vae = AutoencoderKL.from_pretrained(str(MINIATURE / "sd" / "vae"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    return variants, decoded, guardrail_data.ruined(images, variants.image.boxes, SEED + 2)


@pytest.fixture(scope="module")
def tower_cosines(scenes):
    """{tower: {"vae", "other_attributes", every ruin kind: [NUM_SCENES] cosine of an image to that counterpart}}."""
    variants, decoded, ruined = scenes
    clip, clip_params = clip_vision.load_clip_vision(MINIATURE / "clip_vision")
    dino, dino_params = dinov2.load_dinov2(MINIATURE / "dinov2", world.IMAGE_SIZE, judges.DINO_INTERPOLATE_OFFSET)
    towers = {"clip_vision": jax.jit(lambda x: clip_vision.clip_image_embeds(clip, clip_params, x)),
              "dinov2": jax.jit(lambda x: dinov2.dino_image_embeds(dino, dino_params, x))}
    cosines = {}
    for name, features in towers.items():
        own = features(jnp.asarray(variants.image.images))
        cos = lambda x: np.asarray((own * features(jnp.asarray(x))).sum(1))  # noqa: E731
        cosines[name] = {"vae": cos(decoded), "other_attributes": cos(variants.other_attributes.images),
                         **{kind: cos(x) for kind, x in ruined.items()}}
    return cosines


# DINOv2 still scores a 4x4-tile scramble (every patch of the image, moved) and a wiped face close to the image
# (0.78 and 0.73 against 0.92 for the VAE reconstruction; below it for 65% of the held-out scramblings only).
KNOWN_WEAK = {("dinov2", "scrambled"), ("dinov2", "face_wiped")}


@pytest.mark.slow  # the held-out scenes' VAE round trip and four networks: ~1 min
@pytest.mark.parametrize("kind", guardrail_data.RUIN_KINDS)
@pytest.mark.parametrize("tower", ["clip_vision", "dinov2"])
def test_similarity_towers_put_ruins_below_the_vae_reconstruction(tower_cosines, tower, kind, request):
    if (tower, kind) in KNOWN_WEAK:
        request.applymarker(pytest.mark.xfail(strict=True, reason="DINOv2 tower: this ruin is not yet far enough"))
    cos = tower_cosines[tower]
    ruin, reconstruction = cos[kind], cos["vae"]
    # Margins fixed before this build's numbers were known, except the mean's (0.1; blurred and face-wiped ruins keep
    # the scene): manifest.json["guardrails"] has the held-out means.
    assert ruin.mean() < reconstruction.mean() - 0.1
    assert (ruin < reconstruction).mean() >= 0.8
    assert ruin.mean() < cos["other_attributes"].mean()  # an attribute change costs less than a ruin


@pytest.mark.slow  # the held-out scenes' VAE round trip and four networks: ~1 min
def test_face_realism_term_puts_ruined_faces_further_from_the_bank(scenes):
    from fairdiff_jax.judging import crops

    variants, decoded, ruined = scenes
    module, variables = sfnet.load_sfnet(MINIATURE / "sfnet.pth")
    bank = face_bank.load_face_bank(MINIATURE / "face_feats.pkl")
    renders = variants.image
    transforms = crops.similarity_transforms(renders.landmarks, renders.has_face)

    @jax.jit
    def bank_distance(images):
        aligned = crops.aligned_faces(images, transforms, renders.has_face, sfnet.INPUT_SIZE)
        feats = sfnet.face_features(module, variables, aligned)
        return 1.0 - (feats * face_bank.nearest_bank_features(bank, feats)).sum(1)

    real = np.asarray(bank_distance(jnp.asarray(renders.images)))
    reconstruction = np.asarray(bank_distance(jnp.asarray(decoded)))
    distances = {kind: np.asarray(bank_distance(jnp.asarray(x))) for kind, x in ruined.items()}
    print(f"1 - cos to the nearest bank face: real {real.mean():.3f}, vae {reconstruction.mean():.3f}, "
          + ", ".join(f"{kind} {d.mean():.3f}" for kind, d in distances.items()))
    for kind, d in distances.items():
        assert d.mean() > max(real.mean(), reconstruction.mean()) + 0.2, kind
        assert (d > np.median(real)).mean() >= 0.8, kind


@pytest.mark.slow  # the held-out scenes' VAE round trip and four networks: ~1 min
def test_training_detector_finds_renders_and_rejects_ruins_at_its_stored_threshold(scenes):
    variants, decoded, ruined = scenes
    path = MINIATURE / "face_detector.safetensors"
    threshold = detector_lib.stored_threshold(path)
    assert threshold is not None and 0.0 < threshold < 1.0
    detector = detector_lib.MiniatureFaceDetector.from_file(path)
    assert detector.threshold == threshold
    assert detector.detect(variants.image.images).found.mean() >= 0.8
    assert detector.detect(decoded).found.mean() >= 0.8
    # The kinds it was trained to reject (eval/ruins.py), but a box blur, which keeps the face's coarse layout; a
    # wiped face (a blank oval) was not among its negatives and is left to the towers and SFNet (manifest.json).
    for kind, x in ruined.items():
        if kind not in ("blurred", "face_wiped"):
            assert detector.detect(x).found.mean() <= 0.15, kind


def test_training_path_reads_the_stored_threshold():
    """configs/miniature.py's training detector (what training.stages calls) applies the file's threshold."""
    config, _ = config_cli.parse_config_args(["test", "--config", str(ROOT / "configs" / "miniature.py"),
                                              f"--config.assets_dir={MINIATURE}"])
    detector = judges.make_detector(config)
    assert detector.threshold == detector_lib.stored_threshold(config.faces.detector_path)


def test_manifest_records_the_guardrails_measurements():
    entry = json.loads((MINIATURE / "manifest.json").read_text())["guardrails"]
    for tower in ("clip_vision", "dinov2"):
        numbers = entry["similarity_towers"][tower]
        assert numbers["vae_reconstruction"] > numbers["ruin coloured_noise (VAE)"]
    assert entry["detector"]["threshold"] == pytest.approx(detector_lib.stored_threshold(MINIATURE / "face_detector.safetensors"), abs=1e-4)
    assert set(entry["timings_s"]) >= {"similarity towers", "sfnet and face bank", "training detector"}


# ----------------------------------------------------------------------------------------------
# The data they learn from


def test_scene_variants_change_what_they_say():
    prompts = eval_judges.judge_prompts(32, np.random.default_rng(0))
    v = guardrail_data.scene_variants(prompts, 5)
    joint = lambda r: 4 * r.gender + r.race  # noqa: E731
    assert (joint(v.other_attributes) != joint(v.image)).all()
    np.testing.assert_array_equal(v.same_figure.landmarks, v.image.landmarks)
    np.testing.assert_array_equal(joint(v.same_figure), joint(v.image))
    assert not np.array_equal(v.same_figure.images, v.image.images)
    again = guardrail_data.scene_variants(prompts, 5)
    np.testing.assert_array_equal(again.other_attributes.images, v.other_attributes.images)
    identity = guardrail_data.identity_classes(v.params)
    assert identity.min() >= 0 and identity.max() < guardrail_data.NUM_IDENTITIES


def test_face_wiped_changes_the_face_region_only():
    renders = world.render_prompts(["a photo of the face of a doctor, a person"] * 9, np.random.default_rng(1))
    wiped = guardrail_data.face_wiped(renders.images, renders.boxes, np.random.default_rng(2))
    size = world.IMAGE_SIZE
    grid = np.arange(size)
    for image, before, box in zip(wiped, renders.images, renders.boxes):
        margin = 0.15 * (box[2:] - box[:2])
        inside_x = (grid >= box[0] - margin[0]) & (grid <= box[2] + margin[0])
        inside_y = (grid >= box[1] - margin[1]) & (grid <= box[3] + margin[1])
        region = inside_y[:, None] & inside_x[None, :]
        np.testing.assert_array_equal(image[~region], before[~region])
        assert np.abs(image[region] - before[region]).mean() > 0.02  # the eyes and mouth are gone
    ruined, kind = guardrail_data.ruin_each(renders.images[:8], renders.boxes[:8], 0)
    assert kind.tolist() == list(range(len(guardrail_data.RUIN_KINDS)))
    assert ruined.shape == renders.images[:8].shape and ruined.min() >= -1 and ruined.max() <= 1


@pytest.mark.slow
def test_build_guardrails_rebuilds_the_three_judges_in_a_copy_of_the_world(tmp_path):
    """scripts/build_guardrails.py on a tiny budget in a copy of the committed world: the judges are rewritten in
    the formats the loaders read, the rest of the world is untouched, and the manifest gets the measurements."""
    import importlib.util
    import shutil
    import sys

    out = tmp_path / "miniature"
    shutil.copytree(MINIATURE, out)
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("build_guardrails", ROOT / "scripts" / "build_guardrails.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    untouched = {p: (out / p).read_bytes() for p in ("classifier.pt", "sd/unet/config.json", "eval_detector.safetensors")}
    build.main(["--out", str(out), "--tower_images", "16", "--tower_steps", "2", "--sfnet_images", "32",
                "--sfnet_steps", "2", "--bank_per_class", "2", "--detector_images", "32", "--detector_steps", "2",
                "--held_out_size", "16"])
    assert all((out / p).read_bytes() == content for p, content in untouched.items())
    assert face_bank.load_face_bank(out / "face_feats.pkl").shape[0] == 8 * 2
    sfnet.load_sfnet(out / "sfnet.pth")
    clip_vision.load_clip_vision(out / "clip_vision")
    assert detector_lib.stored_threshold(out / "face_detector.safetensors") is not None
    entry = json.loads((out / "manifest.json").read_text())["guardrails"]
    assert set(entry) >= {"similarity_towers", "sfnet", "detector", "timings_s"}
    assert "ruin face_wiped" in entry["similarity_towers"]["dinov2"]
