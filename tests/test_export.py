"""`python -m fairdiff_jax.export`: a training checkpoint -> the original's .pth files and PEFT safetensors,
plain and EMA, only for the trained parts; a missing step fails with the available steps listed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from fairdiff_jax.sd import lora
from fairdiff_jax.sd.loader import load_stable_diffusion
from fairdiff_jax.sd.tiny import build_tiny_sd
from fairdiff_jax.training import checkpoints, export, optim
from fairdiff_jax.training import step as debias_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return load_stable_diffusion(build_tiny_sd(tmp_path_factory.mktemp("sd") / "model"))


def save_run(workdir, sd, train_text_encoder, train_unet, steps=(2, 4)):
    """A checkpoint folder as train.py writes it, with a LoRA and an EMA that differ (random updates)."""
    params = debias_step.init_lora(jax.random.key(0), sd, 3, train_text_encoder, train_unet)
    state = optim.create_train_state(params, optim.make_optimizer(learning_rate=1e-2), 0.996, 0)
    rng = np.random.default_rng(0)
    with checkpoints.Checkpointer(workdir / "checkpoints", every_steps=2, keep=5, permanent_every_steps=None) as checkpointer:
        for step in range(1, max(steps) + 1):
            grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), state.params)
            state, _ = optim.apply_gradients(state, grads)
            if step in steps:
                checkpointer.save(state, {"epoch": 0, "index": step}, force=True)
    return state


@pytest.mark.parametrize("train_text_encoder, train_unet", [(True, False), (False, True), (True, True)])
def test_export_writes_the_trained_parts_in_both_formats(tmp_path, tiny_sd, train_text_encoder, train_unet):
    state = save_run(tmp_path, tiny_sd, train_text_encoder, train_unet)
    out = export.export(tmp_path, 4)
    assert out == tmp_path / "checkpoint-4_exported"
    parts = [p for p, trained in (("text_encoder", train_text_encoder), ("unet", train_unet)) if trained]
    expected = {f"{p}_lora{suffix}.pth" for p in parts for suffix in ("", "_EMA")} | {"pytorch_lora_weights.safetensors", "EMA"}
    assert {p.name for p in out.iterdir()} == expected
    frozen = {"text_encoder": tiny_sd.text_encoder_params, "unet": tiny_sd.unet_params}
    for part in parts:
        for suffix, tree in (("", state.params[part]), ("_EMA", state.ema_params[part])):
            loaded = lora.load_original(out / f"{part}_lora{suffix}.pth", frozen[part], part)
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, tree)
    # EMA and plain differ; the PEFT files hold the same numbers as the .pth files (lora_A = down^T).
    for folder, tree in ((out, state.params), (out / "EMA", state.ema_params)):
        tensors = load_file(str(folder / "pytorch_lora_weights.safetensors"))
        assert {k.split(".")[0] for k in tensors} == set(parts)
        for part in parts:
            original = lora.original_state_dict(tree[part], part)
            assert sum(k.startswith(part + ".") for k in tensors) == len(original)
    first_part = parts[0]
    assert not np.array_equal(
        np.asarray(jax.tree.leaves(state.params[first_part])[0]), np.asarray(jax.tree.leaves(state.ema_params[first_part])[0])
    )


def test_read_state_returns_the_saved_training_state(tmp_path, tiny_sd):
    state = save_run(tmp_path, tiny_sd, True, False)
    restored = export.read_state(tmp_path, 4)
    assert int(restored["step"]) == 4 and int(restored["ema_count"]) == 4
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), restored["params"], dict(state.params))
    count = [x for x in jax.tree.leaves(restored["opt_state"]) if np.ndim(x) == 0]
    assert count and all(int(c) == 4 for c in count)  # AdamW's step count


def test_missing_step_names_the_available_ones(tmp_path, tiny_sd):
    save_run(tmp_path, tiny_sd, True, False)
    result = subprocess.run([sys.executable, "-m", "fairdiff_jax.export", "--workdir", str(tmp_path), "--step", "3"],
                            cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2
    assert "no checkpoint for step 3" in result.stderr and "available steps: 2, 4" in result.stderr
    with pytest.raises(export.ExportError, match="available steps: none"):
        export.export(tmp_path / "elsewhere", 1)


def test_without_step_the_newest_checkpoint_is_exported(tmp_path, tiny_sd, capsys):
    save_run(tmp_path, tiny_sd, True, False, steps=(2, 4))
    assert export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    step_4 = export.read_state(tmp_path, 4)["ema_params"]["text_encoder"]
    loaded = lora.load_original(tmp_path / "out" / "text_encoder_lora_EMA.pth", tiny_sd.text_encoder_params, "text_encoder")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, step_4)
    assert export.main(["--workdir", str(tmp_path / "empty")]) == 2
    assert "no finished checkpoint" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_an_error_naming_it(tmp_path, tiny_sd):
    save_run(tmp_path, tiny_sd, True, False)
    (tmp_path / "checkpoints" / "4" / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(export.ExportError, match=r"checkpoint 4 in .* cannot be read \(.*\); other steps: 2"):
        export.export(tmp_path, 4)
    assert not (tmp_path / "checkpoint-4_exported").exists()


def test_a_nan_lora_is_not_exported(tmp_path, tiny_sd):
    params = debias_step.init_lora(jax.random.key(0), tiny_sd, 3, True, False)
    params = jax.tree.map(lambda x: x * np.nan, params)  # the 'up' zeros too: NaN * 0 is NaN
    state = optim.create_train_state(params, optim.make_optimizer(learning_rate=1e-2), 0.996, 0)
    with checkpoints.Checkpointer(tmp_path / "checkpoints", every_steps=1) as checkpointer:
        checkpointer.save(state, {}, force=True)
    with pytest.raises(export.ExportError, match=r"checkpoint 0 .*: \d+ of \d+ LoRA values are not finite"):
        export.export(tmp_path, 0)


def test_export_replaces_the_folder_whole_or_not_at_all(tmp_path, tiny_sd, monkeypatch):
    save_run(tmp_path, tiny_sd, True, True)
    out = export.export(tmp_path, 2, tmp_path / "out")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fails(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora, "save_diffusers", fails)  # the .pth files are written, then the safetensors fail
    with pytest.raises(OSError, match="No space left"):
        export.export(tmp_path, 4, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "out"]  # no temporary folder left

    monkeypatch.undo()
    export.export(tmp_path, 4, out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in after)


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_the_same_weights_give_the_same_bytes(tmp_path, tiny_sd):
    save_run(tmp_path, tiny_sd, True, True)
    files = [export.export(tmp_path, 4, tmp_path / f"out{i}") / "pytorch_lora_weights.safetensors" for i in range(4)]
    assert len({f.read_bytes() for f in files}) == 1
    header = files[0].read_bytes()[8 : 8 + int.from_bytes(files[0].read_bytes()[:8], "little")]
    keys = list(json.loads(header))
    assert keys == sorted(keys)
