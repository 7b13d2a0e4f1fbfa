"""`python -m fairdiff_jax.generate` end to end on the tiny model: file names, resuming, noise that
does not depend on the batch size, LoRA files, and one-line errors for bad inputs."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from fairdiff_jax.sd import generation as generate
from fairdiff_jax.sd import lora
from fairdiff_jax.sd import tiny as tiny_sd
from fairdiff_jax.sd.loader import load_stable_diffusion

# Text is padded to 77 tokens, so every run below reuses one compiled sampler per batch size.
PROMPTS = list(generate.DEMO_PROMPTS)
FAST = ["--steps", "2", "--dtype", "float32", "--seed", "7"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_sd.build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps({"train_prompts": PROMPTS, "val_prompts": PROMPTS, "test_prompts": PROMPTS}))
    return path


def _run(model, prompt_file, save_dir, num, batch, extra=()):
    generate.main(
        ["--model", str(model), "--prompts", str(prompt_file), "--save_dir", str(save_dir),
         "--num_imgs_per_prompt", str(num), "--batch_size", str(batch), *FAST, *extra]
    )


def _mtimes(save_dir):
    return {p.relative_to(save_dir).as_posix(): p.stat().st_mtime_ns for p in save_dir.rglob("*.jpg")}


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.float32)


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_files_resume_and_batch_independence(model, prompt_file, tmp_path, capsys):
    first = tmp_path / "first"
    _run(model, prompt_file, first, num=2, batch=1)
    before = _mtimes(first)
    assert sorted(before) == ["prompt_0/img_0.jpg", "prompt_0/img_1.jpg", "prompt_1/img_0.jpg", "prompt_1/img_1.jpg"]
    assert "4 images generated, 0 already there" in capsys.readouterr().err

    _run(model, prompt_file, first, num=3, batch=1)  # a larger count keeps the first images
    after = _mtimes(first)
    assert set(after) == set(before) | {"prompt_0/img_2.jpg", "prompt_1/img_2.jpg"}
    assert all(after[name] == before[name] for name in before)
    assert "2 images generated, 4 already there" in capsys.readouterr().err

    second = tmp_path / "second"
    _run(model, prompt_file, second, num=3, batch=3)
    for name in after:
        a, b = _pixels(first / name), _pixels(second / name)
        # Same noise; batch-1 and batch-3 XLA kernels may round differently in the last bit, which
        # JPEG can turn into a level or two. Different images differ by tens of levels on average.
        assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 8, name
    assert np.abs(_pixels(first / "prompt_0/img_0.jpg") - _pixels(first / "prompt_0/img_1.jpg")).mean() > 5
    assert np.abs(_pixels(first / "prompt_0/img_0.jpg") - _pixels(first / "prompt_1/img_0.jpg")).mean() > 1
    assert not list(first.rglob("*.tmp"))


def test_noise_depends_on_seed_prompt_and_index_only():
    a = np.asarray(generate.initial_noise(7, "a cat", [0, 1, 2], (4, 4, 4)))
    b = np.asarray(generate.initial_noise(7, "a cat", [2], (4, 4, 4)))
    np.testing.assert_array_equal(a[2], b[0])
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], np.asarray(generate.initial_noise(7, "a dog", [0], (4, 4, 4)))[0])
    assert not np.array_equal(a[0], np.asarray(generate.initial_noise(8, "a cat", [0], (4, 4, 4)))[0])


def test_demo_runs(tmp_path):
    generate.main(["--demo", "--save_dir", str(tmp_path), "--num_imgs_per_prompt", "1", "--batch_size", "1", *FAST])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg")) == [
        "prompt_0/img_0.jpg", "prompt_1/img_0.jpg"
    ]


def _error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(argv)
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def test_bad_inputs_give_one_line_errors(model, prompt_file, tmp_path, capsys):
    out = ["--save_dir", str(tmp_path / "out")]
    message = _error(["--model", str(tmp_path / "absent"), "--prompts", str(prompt_file), *out], capsys)
    assert "Stable Diffusion model folder not found" in message and "absent" in message
    (tmp_path / "empty_model").mkdir()
    message = _error(["--model", str(tmp_path / "empty_model"), "--prompts", str(prompt_file), *out], capsys)
    assert "empty_model has no unet/ subfolder" in message

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    message = _error(["--model", str(model), "--prompts", str(bad_json), *out], capsys)
    assert "bad.json" in message
    no_key = tmp_path / "no_key.json"
    no_key.write_text(json.dumps({"train_prompts": PROMPTS, "val_prompts": PROMPTS}))
    message = _error(["--model", str(model), "--prompts", str(no_key), *out], capsys)
    assert "no_key.json" in message and "'test_prompts'" in message
    wrong_type = tmp_path / "wrong_type.json"
    wrong_type.write_text(json.dumps({"train_prompts": PROMPTS, "val_prompts": PROMPTS, "test_prompts": "a doctor"}))
    message = _error(["--model", str(model), "--prompts", str(wrong_type), *out], capsys)
    assert "wrong_type.json" in message and "'test_prompts'" in message
    message = _error(["--model", str(model), "--save_dir", str(tmp_path)], capsys)
    assert "--prompts is required" in message
    assert not (tmp_path / "out").exists()


def test_cli_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fairdiff_jax.generate", "--model", str(tmp_path), "--prompts",
         str(tmp_path / "missing.json"), "--save_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "missing.json" in result.stderr and "Traceback" not in result.stderr


def _lora_files(model, folder, up_std):
    """The original's .pth files for the tiny model: lora.init (up = 0), then up ~ N(0, up_std^2)."""
    sd = load_stable_diffusion(model)
    paths = {}
    for i, (name, params) in enumerate((("text_encoder", sd.text_encoder_params), ("unet", sd.unet_params))):
        key = jax.random.key(i)
        flat = traverse_util.flatten_dict(lora.init(key, params, lora.select_targets(params, name), rank=4))
        for j, path in enumerate(p for p in flat if p[-1] == "up"):
            flat[path] = up_std * jax.random.normal(jax.random.fold_in(key, j), flat[path].shape)
        paths[name] = folder / f"{name}_lora.pth"
        lora.save_original(traverse_util.unflatten_dict(flat), paths[name], name)
    return paths


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_lora_files(model, prompt_file, tmp_path, capsys):
    _run(model, prompt_file, tmp_path / "base", num=1, batch=1)
    names = ["prompt_0/img_0.jpg", "prompt_1/img_0.jpg"]

    zero = _lora_files(model, tmp_path / "zero", up_std=0.0)
    _run(model, prompt_file, tmp_path / "zero_lora", num=1, batch=1,
         extra=["--text_encoder_lora", str(zero["text_encoder"]), "--unet_lora", str(zero["unet"])])
    for name in names:  # up = 0: the merged model is the frozen one, bit for bit
        np.testing.assert_array_equal(_pixels(tmp_path / "zero_lora" / name), _pixels(tmp_path / "base" / name))

    trained = _lora_files(model, tmp_path / "trained", up_std=0.1)
    for flag, path in (("--text_encoder_lora", trained["text_encoder"]), ("--unet_lora", trained["unet"])):
        out = tmp_path / flag.strip("-")
        _run(model, prompt_file, out, num=1, batch=1, extra=[flag, str(path)])
        for name in names:
            assert np.abs(_pixels(out / name) - _pixels(tmp_path / "base" / name)).mean() > 1, (flag, name)

    capsys.readouterr()
    base = ["--model", str(model), "--prompts", str(prompt_file), "--save_dir", str(tmp_path / "bad"), *FAST]
    with pytest.raises(SystemExit):  # a UNet file given as the text encoder's
        generate.main([*base, "--text_encoder_lora", str(trained["unet"])])
    message = capsys.readouterr().err
    assert f"{trained['unet']} is not a text_encoder LoRA of this model" in message and "missing keys" in message
    message = _error([*base, "--unet_lora", str(tmp_path / "absent.pth")], capsys)
    assert "absent.pth" in message
    message = _error([*base, "--unet_lora", str(tmp_path / "lora.safetensors")], capsys)
    assert "lora.safetensors" in message and ".pth" in message
    assert not (tmp_path / "bad").exists()


def test_images_of_another_lora_are_refused_not_reused(model, prompt_file, tmp_path, capsys):
    out = tmp_path / "out"
    _run(model, prompt_file, out, num=1, batch=1)
    base = _pixels(out / "prompt_0/img_0.jpg")
    trained = _lora_files(model, tmp_path / "trained", up_std=0.1)
    with_lora = ["--unet_lora", str(trained["unet"])]
    capsys.readouterr()
    message = _error(["--model", str(model), "--prompts", str(prompt_file), "--save_dir", str(out),
                      "--num_imgs_per_prompt", "1", "--batch_size", "1", *FAST, *with_lora], capsys)
    assert "holds images made otherwise" in message and "lora_sha256" in message and "--overwrite" in message
    np.testing.assert_array_equal(_pixels(out / "prompt_0/img_0.jpg"), base)  # untouched

    _run(model, prompt_file, out, num=1, batch=1, extra=[*with_lora, "--overwrite"])
    assert np.abs(_pixels(out / "prompt_0/img_0.jpg") - base).mean() > 1  # regenerated with the LoRA
    _run(model, prompt_file, out, num=1, batch=1, extra=with_lora)  # same LoRA again: reused
    assert "0 images generated, 2 already there" in capsys.readouterr().err


def test_nan_lora_stops_generation_with_a_message(model, prompt_file, tmp_path, capsys):
    nan = _lora_files(model, tmp_path / "nan", up_std=float("nan"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        _run(model, prompt_file, out, num=1, batch=1, extra=["--unet_lora", str(nan["unet"])])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 of 1 images not finite (img_0.jpg)" in message and "prompt_0" in message
    assert not list(out.rglob("*.jpg"))
