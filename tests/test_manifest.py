"""An image folder's generation.json: images are reused only when the same files and settings made them."""

import json

import pytest

from fairdiff_jax.sd import manifest

MADE_BY = {"model_sha256": "m", "dtype": "float32", "lora_sha256": {"unet": "u1"}, "seed": 0, "guidance_scale": 7.5,
           "num_denoising_steps": 30, "latent_shape": [64, 64, 4]}


def _image(folder, i=0, j=0):
    path = folder / f"prompt_{i}" / f"img_{j}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"jpeg")
    return path


@pytest.mark.parametrize("change", [{"guidance_scale": 5.0}, {"seed": 1}, {"num_denoising_steps": 25},
                                    {"lora_sha256": {"unet": "u2"}}, {"model_sha256": "other"},
                                    {"latent_shape": [32, 32, 4]}])
def test_a_changed_setting_is_refused_then_overwritten(tmp_path, change):
    manifest.claim_folder(tmp_path, MADE_BY, ["a doctor"])
    image = _image(tmp_path)
    changed = {**MADE_BY, **change}
    with pytest.raises(manifest.StaleImagesError, match=f"{next(iter(change))}: .* there, .* now"):
        manifest.claim_folder(tmp_path, changed, ["a doctor"])
    assert image.exists()
    manifest.claim_folder(tmp_path, changed, ["a doctor"], overwrite=True)
    assert not image.exists()
    assert json.loads((tmp_path / manifest.MANIFEST_NAME).read_text())["made_by"] == changed


def test_more_prompts_extend_but_another_text_is_refused(tmp_path):
    manifest.claim_folder(tmp_path, MADE_BY, ["a doctor"])
    manifest.claim_folder(tmp_path, MADE_BY, ["a doctor", "a nurse"])
    manifest.claim_folder(tmp_path, MADE_BY, ["a doctor"])  # a shorter list: the stored one stays
    assert json.loads((tmp_path / manifest.MANIFEST_NAME).read_text())["prompts"] == ["a doctor", "a nurse"]
    with pytest.raises(manifest.StaleImagesError, match="prompt_1: 'a nurse' there, 'a pilot' now"):
        manifest.claim_folder(tmp_path, MADE_BY, ["a doctor", "a pilot"])


def test_images_without_a_manifest_are_refused(tmp_path):
    _image(tmp_path)
    with pytest.raises(manifest.StaleImagesError, match="no generation.json"):
        manifest.claim_folder(tmp_path, MADE_BY, ["a doctor"])


def test_fingerprints_follow_content(tmp_path):
    (tmp_path / "m" / "unet").mkdir(parents=True)
    weights = tmp_path / "m" / "unet" / "w.safetensors"
    weights.write_bytes(b"\0" * (3 << 20))
    first = manifest.model_fingerprint(tmp_path / "m")
    weights.write_bytes(b"\0" * (3 << 20) + b"\1")  # a longer file
    assert manifest.model_fingerprint(tmp_path / "m") != first
    weights.write_bytes(b"\0" * (3 << 20))
    assert manifest.model_fingerprint(tmp_path / "m") == first  # the same content again
    lora = tmp_path / "l.pth"
    lora.write_bytes(b"abc")
    files = manifest.ModelFiles(tmp_path / "m", "float32", {"unet": lora, "text_encoder": None})
    made_by = manifest.recipe(files, seed=0, guidance=7.5, steps=2, latent_shape=(4, 4, 4))
    assert set(made_by["lora_sha256"]) == {"unet"} and made_by["model_sha256"] == first
