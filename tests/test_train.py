"""`python -m fairdiff_jax.train` end to end on tiny random models (configs/tiny.py) on 2 CPU devices.

- a run stopped after 2 steps and resumed to 4 ends with the same checkpoint (LoRA, EMA, AdamW state, EMA
  count, step) as an uninterrupted 4-step run; the LoRA moved away from its initialisation, every loss term
  was logged, the evaluation wrote grids and metrics;
- bad inputs (unknown config key, missing classifier / face bank, off-schema prompt file) fail with exit
  code 2 and a message naming them, before anything compiles (JAX_LOG_COMPILES shows no compilation);
- the no-gradient generation stage gives the same images on 1 and on 2 devices.

Subprocesses share a persistent compilation cache, so only the first run of the session compiles everything.
The training and device-count tests are marked slow (minutes on a CPU): `pytest -m slow tests/test_train.py`.
"""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from fairdiff_jax.judging.tiny import build_tiny_assets
from fairdiff_jax.training import export
from fairdiff_jax.training.loop import device_notice

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny.py"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("tiny_assets"))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def run(args, compile_cache, devices=2, log_compiles=False, timeout=900, env=None):
    env = {**os.environ, **(env or {})}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=str(compile_cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    if log_compiles:
        env["JAX_LOG_COMPILES"] = "1"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train(workdir, assets, compile_cache, *overrides, resume=False):
    args = ["-m", "fairdiff_jax.train", *TINY, f"--config.assets_dir={assets}", "--workdir", str(workdir), *overrides]
    result = run(args + (["--resume"] if resume else []), compile_cache)
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_trees_equal(a, b, atol=1e-6):
    flat_a = dict(_flatten(a))
    flat_b = dict(_flatten(b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_allclose(flat_a[key], flat_b[key], rtol=0, atol=atol, err_msg=key)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}/{i}")
    elif tree is not None:  # optax's empty states restore as None
        yield prefix, np.asarray(tree)


@pytest.mark.slow  # ~6 min on a busy 2-core CPU (3 training processes, compiling 2 step counts)
def test_resumed_run_equals_uninterrupted_run(tmp_path, assets, compile_cache):
    whole = tmp_path / "whole"
    # Both runs decay the learning rate over the 4 steps, so the schedule's count must resume too.
    decay = "--config.optim.decay_steps=4"
    # The uninterrupted run also evaluates (current and EMA weights) at step 0 and, every 4 steps, at its last.
    train(whole, assets, compile_cache, "--config.train.max_steps=4", "--config.eval.at_start=true",
          "--config.eval.every_steps=4", decay)
    split = tmp_path / "split"
    train(split, assets, compile_cache, "--config.train.max_steps=2", decay)
    assert export.available_steps(split / "checkpoints") == [2]
    resumed = train(split, assets, compile_cache, "--config.train.max_steps=4", decay, resume=True)
    assert "resumed from step 2" in resumed.stderr
    assert "training on 2 device(s): cpu (cpu)" in resumed.stderr
    assert "is about to train on the CPU" not in resumed.stderr  # a 32 px model: no device warning (TensorFlow logs its own WARNING lines)

    state_whole = export.read_state(whole, 4)
    state_split = export.read_state(split, 4)
    assert int(state_whole["step"]) == 4 and int(state_whole["ema_count"]) == 4 - sum(
        m["skipped"] for m in read_metrics(whole) if m["kind"] == "train"
    )
    assert_trees_equal(state_whole, state_split)

    # Training happened: every LoRA 'up' factor started at zero; after 4 AdamW steps they are not all zero.
    ups = [v for k, v in _flatten(state_whole["params"]) if k.endswith("/up")]
    assert max(np.abs(u).max() for u in ups) > 0
    assert set(state_whole["params"]) == {"text_encoder", "unet"}

    # Same per-step logs (prompt, denoising steps, loss) in both runs; every loss term logged at least once.
    train_logs = [m for m in read_metrics(whole) if m["kind"] == "train"]
    split_logs = [m for m in read_metrics(split) if m["kind"] == "train"]
    assert [m["step"] for m in train_logs] == [1, 2, 3, 4] == [m["step"] for m in split_logs]
    for a, b in zip(train_logs, split_logs):
        assert (a["prompt"], a["denoising_steps"]) == (b["prompt"], b["denoising_steps"])
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    # The logged rate is the half cosine at the updates applied before each step: lr (1 + cos(pi k / 4)) / 2.
    learning_rate = json.loads((whole / "config.json").read_text())["optim"]["learning_rate"]
    applied = np.cumsum([0] + [m["skipped"] == 0 for m in train_logs[:-1]])
    for logs in (train_logs, split_logs):
        np.testing.assert_allclose([m["learning_rate"] for m in logs],
                                   learning_rate * (1 + np.cos(np.pi * applied / 4)) / 2, rtol=1e-6)
    logged = set().union(*train_logs)
    assert {"loss_CLIP", "loss_DINO", "loss_face", "loss_fair_gender", "gender_bias", "race_bias", "gender_race_bias"} <= logged
    assert {m["denoising_steps"] for m in train_logs} <= {2, 3}

    evals = [m for m in read_metrics(whole) if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [0, 0, 4, 4]
    # The evaluator of before_after, under the training log's names: bias beside fidelity, consistency, face share.
    for weights, logged_eval in zip(("current", "ema", "current", "ema"), evals):
        assert {f"{weights}/{m}" for m in ("gender_bias", "gender_race_bias", "face_share", "degenerate_share",
                                           "fidelity_precision", "fidelity_recall", "consistency")} <= set(logged_eval)
    for step in (0, 4):
        assert len(list((whole / "eval" / f"step_{step}" / "current").glob("prompt_*.jpg"))) == 4  # 1 per kind

    # Export, then generate with the exported LoRA files.
    out = tmp_path / "exported"
    result = run(["-m", "fairdiff_jax.export", "--workdir", str(whole), "--step", "4", "--out", str(out)], compile_cache)
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert {"text_encoder_lora.pth", "text_encoder_lora_EMA.pth", "unet_lora.pth", "unet_lora_EMA.pth",
            "pytorch_lora_weights.safetensors", "EMA"} <= names
    assert (out / "EMA" / "pytorch_lora_weights.safetensors").is_file()
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps({"train_prompts": ["a"], "val_prompts": ["a"], "test_prompts": ["a photo of a doctor"]}))
    images = tmp_path / "images"
    result = run(["-m", "fairdiff_jax.generate", "--model", str(assets / "sd"), "--prompts", str(prompts_file),
                  "--save_dir", str(images), "--num_imgs_per_prompt", "2", "--batch_size", "2", "--steps", "2",
                  "--dtype", "float32", "--text_encoder_lora", str(out / "text_encoder_lora_EMA.pth"),
                  "--unet_lora", str(out / "unet_lora_EMA.pth")], compile_cache, devices=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (images / "prompt_0").iterdir()) == ["img_0.jpg", "img_1.jpg"]

    result = run(["-m", "fairdiff_jax.export", "--workdir", str(whole), "--step", "3"], compile_cache)
    assert result.returncode == 2 and "no checkpoint for step 3" in result.stderr and "available steps: 2, 4" in result.stderr


def _bad_prompts_dir(tmp_path):
    folder = tmp_path / "prompts"
    shutil.copytree(ROOT / "fairdiff_jax" / "data" / "prompts", folder)
    sports = json.loads((folder / "sports.json").read_text())
    del sports["val_prompts"]
    (folder / "sports.json").write_text(json.dumps(sports))
    return folder


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.train.no_such_key=1", ["no_such_key"]),
        ("--config.model.classifier_path=/nonexistent/classifier.pt", ["config.model.classifier_path", "/nonexistent/classifier.pt"]),
        ("--config.model.face_bank_path=/nonexistent/face_feats.pkl", ["config.model.face_bank_path", "/nonexistent/face_feats.pkl"]),
        ("PROMPTS", ["sports.json", "val_prompts"]),
        ("--config.train.micro_batch_size=0", ["config.train.micro_batch_size must be an integer >= 1, got 0"]),
        ("--config.optim.learning_rate=nan", ["config.optim.learning_rate", "got nan"]),
        ("--config.train.max_steps=0", ["config.train.max_steps"]),
    ],
)
def test_bad_inputs_fail_by_name_before_compiling(tmp_path, assets, compile_cache, override, expected):
    if override == "PROMPTS":
        override = f"--config.data.prompts_dir={_bad_prompts_dir(tmp_path)}"
    args = ["-m", "fairdiff_jax.train", *TINY, f"--config.assets_dir={assets}", "--workdir", str(tmp_path / "w"), override]
    result = run(args, compile_cache, log_compiles=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    for text in expected:
        assert text in result.stderr
    assert "Compiling" not in result.stderr and "Finished tracing" not in result.stderr
    assert not (tmp_path / "w").exists()


def test_a_truncated_weight_file_is_a_one_line_error(tmp_path, assets, compile_cache):
    broken = tmp_path / "assets"
    shutil.copytree(assets, broken)
    (weights,) = (broken / "sd" / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:3000])  # an interrupted download
    args = ["-m", "fairdiff_jax.train", *TINY, f"--config.assets_dir={broken}", "--workdir", str(tmp_path / "w")]
    result = run(args, compile_cache, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read safetensors file") and str(weights) in last
    assert "Traceback" not in result.stderr


SAME_IMAGES_SCRIPT = """
import sys, numpy as np
from fairdiff_jax import config_cli
from fairdiff_jax.training import step as debias_step
from fairdiff_jax.training.stages import Stages
from fairdiff_jax.judging import judges as judges_lib
from fairdiff_jax.training import parallel
from fairdiff_jax.training import loop as train
config = config_cli.load_config("configs/tiny.py", ["assets_dir=" + sys.argv[1]])
sd, judges, judge_variables = train.load_models(config)
mesh = parallel.make_mesh()
stages = Stages(sd, judges, config, mesh, judges_lib.make_detector(config))
frozen = parallel.replicate(debias_step.frozen_weights(sd, judge_variables), mesh)
import jax
lora = parallel.replicate(debias_step.init_lora(jax.random.key(3), sd, 4, True, True), mesh)
# A LoRA that changes the images: non-zero 'up' factors.
lora = jax.tree.map(lambda x: x + 0.05, lora)
prepared = debias_step.prepare(stages, lora, frozen, "a photo of the face of a doctor", 2, 7, jax.random.key(5))
np.savez(sys.argv[2], images=prepared.images, original=prepared.original_images, probs=prepared.probs[0],
         joint=prepared.targets.joint_probs)
"""


@pytest.mark.slow  # ~2-3 min: two processes compile the generation and judge stages
def test_generation_stage_images_equal_on_1_and_2_devices(tmp_path, assets, compile_cache):
    outputs = {}
    for devices in (1, 2):
        path = tmp_path / f"stage_{devices}.npz"
        result = run(["-c", SAME_IMAGES_SCRIPT, str(assets), str(path)], compile_cache, devices=devices)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[devices] = np.load(path)
    one, two = outputs[1], outputs[2]
    assert one["images"].shape == (4, 32, 32, 3)
    assert np.abs(one["images"] - one["original"]).max() > 1e-3  # the LoRA changed the images
    for key in ("images", "original", "probs"):
        np.testing.assert_allclose(one[key], two[key], rtol=0, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(one["joint"], two["joint"], rtol=0, atol=1e-6)


def _nan_unet_assets(assets, folder):
    """A copy of the tiny assets whose UNet weights are all NaN (a broken download, a diverged fine-tune)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(assets, folder)
    for path in (folder / "sd" / "unet").glob("*.safetensors"):
        save_file({k: np.full_like(v, np.nan) for k, v in load_file(str(path)).items()}, str(path))
    return folder


@pytest.mark.slow  # ~12 min on a busy 2-core CPU: 4 short training processes and 2 that stop before compiling
def test_broken_runs_stop_or_recover_with_a_message(tmp_path, assets, compile_cache):
    import socket

    home = tmp_path / "home"
    home.mkdir()
    workdir = tmp_path / "run"
    base = ["-m", "fairdiff_jax.train", *TINY, f"--config.assets_dir={assets}", "--workdir", str(workdir)]
    env = {"HOME": str(home)}

    # Another run holds the workdir (this process stands in for it): refused, naming it.
    workdir.mkdir()
    (workdir / "train.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "t"}))
    result = run(base, compile_cache, timeout=120, env=env)
    assert result.returncode == 2 and f"in use by process {os.getpid()}" in result.stderr.splitlines()[-1]
    (workdir / "train.lock").unlink()

    result = run(base, compile_cache, env=env)  # 4 steps, checkpoints 2 and 4
    assert result.returncode == 0, result.stderr[-3000:]
    assert export.available_steps(workdir / "checkpoints") == [2, 4] and not (workdir / "train.lock").exists()
    assert not (home / ".keras").exists()  # TensorFlow's Keras settings stay in the run folder

    # --resume with another value: refused before anything loads.
    result = run(base + ["--resume", "--config.train.micro_batch_size=1"], compile_cache, timeout=120, env=env)
    assert result.returncode == 2 and "train.micro_batch_size: 2 -> 1" in result.stderr.splitlines()[-1]

    # The newest checkpoint is damaged: --resume goes back to step 2, retrains 3 and 4, logs each step once.
    (workdir / "checkpoints" / "4" / "state" / "manifest.ocdbt").unlink()
    result = run(base + ["--resume"], compile_cache, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: checkpoint 4 in" in result.stderr and "resumed from step 2" in result.stderr
    assert export.available_steps(workdir / "checkpoints") == [2, 4]
    assert (workdir / "checkpoints_damaged" / "4").is_dir()
    assert [m["step"] for m in read_metrics(workdir) if m["kind"] == "train"] == [1, 2, 3, 4]
    export.read_state(workdir, 4)  # the retrained step 4 reads

    # NaN weights: every step is bad, the run stops after max_bad_steps of them and checkpoints nothing.
    nan_assets = _nan_unet_assets(assets, tmp_path / "nan_assets")
    nan_run = tmp_path / "nan_run"
    result = run(["-m", "fairdiff_jax.train", *TINY, f"--config.assets_dir={nan_assets}", "--workdir", str(nan_run),
                  "--config.train.max_bad_steps=2"], compile_cache, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "training stopped at step 2: 2 bad steps in a row" in result.stderr.splitlines()[-1]
    assert export.available_steps(nan_run / "checkpoints") == []


FULL_DISK_SCRIPT = """
import resource, runpy, signal, sys
# Files may not grow past 20 kB: checkpoint data and TensorBoard events fail to write (EFBIG), as on a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
sys.argv = ["fairdiff_jax.train", *sys.argv[1:]]
runpy.run_module("fairdiff_jax.train", run_name="__main__")
"""


@pytest.mark.slow  # ~5 min: one training process that compiles without the shared cache (its files would not fit)
def test_a_full_disk_stops_the_run_with_its_cause(tmp_path, assets, compile_cache):
    args = ["-c", FULL_DISK_SCRIPT, *TINY, f"--config.assets_dir={assets}", "--workdir", str(tmp_path / "run")]
    # The child's output goes through a pipe, which the file-size limit does not cover.
    result = run(args, tmp_path / "no_cache")
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "failed" in last and "File too large" in last, last


def test_device_notice_warns_loudly_when_a_full_size_model_would_train_on_the_cpu():
    cpus = jax.devices("cpu")
    line, warning = device_notice(cpus, 512)
    assert line.startswith(f"training on {len(cpus)} device(s): cpu")
    assert warning is not None and "512x512" in warning and "on the CPU" in warning and "scripts/setup_env.sh" in warning
    assert device_notice(cpus, 32)[1] is None  # tiny and miniature models are meant for the CPU
    gpus = [types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")] * 2
    line, warning = device_notice(gpus, 512)
    assert line == "training on 2 device(s): gpu (NVIDIA H200)" and warning is None
