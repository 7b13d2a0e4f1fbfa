"""Experiment configs load with experiment 5's values (docs/method.md#hyper-parameters-experiment-5); --config.<key> overrides parse and unknown keys fail
by name; the TPU VM launch script parses and builds the commands it should."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fairdiff_jax import config_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("debias_*.py"))
EXPERIMENT_5 = {"debias_text_encoder": (True, False, 4), "debias_unet": (False, True, 3),
                "debias_text_encoder_and_unet": (True, True, 3)}


def _load(name, *overrides):
    return config_cli.load_config(str(ROOT / "configs" / f"{name}.py"), overrides)


def _flat_keys(config, prefix=""):
    keys = set()
    for key, value in config.items():
        keys.add(prefix + key)
        if hasattr(value, "items"):
            keys |= _flat_keys(value, prefix + key + ".")
    return keys


def test_every_experiment_config_exists_and_loads():
    names = {p.stem for p in CONFIGS}
    assert names == set(EXPERIMENT_5) | {"debias_gender", "debias_race", "debias_gender_race_age"}
    for path in CONFIGS:
        config = config_cli.load_config(str(path))
        assert config.name == path.stem and config.workdir == f"workdirs/{path.stem}"
        assert config.lora.train_text_encoder or config.lora.train_unet
        # Attributes, classifier heads, targets and per-attribute factors agree with each other.
        heads = dict(config.model.classifier_heads)
        for attribute in config.target.attributes:
            marginals = np.asarray(config.target.marginals[attribute])
            assert len(marginals) == heads[attribute] and np.isclose(marginals.sum(), 1.0), (path.stem, attribute)
            assert attribute in config.loss.factor1 and attribute in config.loss.factor2, (path.stem, attribute)
        assert set(config.target.marginals) == set(config.target.attributes)
        assert config.train.images_per_prompt % 8 == 0  # splits over 1, 2, 4 or 8 devices


def test_experiment_5_values_follow_spec_section_3():
    base_keys = None
    for name, (train_te, train_unet, micro_batch) in EXPERIMENT_5.items():
        c = _load(name)
        assert (c.lora.train_text_encoder, c.lora.train_unet, c.train.micro_batch_size) == (train_te, train_unet, micro_batch)
        assert c.seed == 5991 and c.data.shuffle_seed == 5992 and c.lora.rank == 50
        assert (c.optim.learning_rate, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay, c.optim.ema_decay) == (
            5e-5, 0.9, 0.999, 1e-8, 1e-2, 0.996)
        assert (c.train.max_steps, c.train.images_per_prompt, c.model.guidance_scale) == (15000, 40, 7.5)
        assert (c.train.min_denoising_steps, c.train.max_denoising_steps) == (19, 23)
        assert (c.eval.num_denoising_steps, c.generate.num_denoising_steps, c.eval.every_steps, c.eval.at_start) == (25, 30, 200, True)
        assert (c.loss.weight_img, c.loss.weight_face, c.loss.uncertainty_threshold, c.loss.confidence_level) == (8, 0.1, 0.2, 0.8)
        assert c.loss.factor1.to_dict() == {"gender": 0.2, "race": 0.6}
        assert c.loss.factor2.to_dict() == {"gender": 0.2, "race": 0.3}
        assert (c.loss.img_size_small, c.faces.size_face, c.faces.size_aligned_face) == (224, 224, 112)
        assert (c.ckpt.every_steps, c.ckpt.keep, c.ckpt.permanent_every_steps) == (20, 2, 200)
        assert c.target.attributes == ("gender", "race") and c.target.marginals.race == (0.25,) * 4
        assert c.model.classifier_heads == (("gender", 2), ("race", 4)) and c.model.dtype == "bfloat16"
        assert c.data.prompt_repeats.to_dict() == {"occupation": 1, "occupation_w_style_and_context": 6,
                                                    "personal_descriptor": 20, "sports": 4}
        keys = _flat_keys(c)
        assert base_keys is None or keys == base_keys  # one schema for the three variants
        base_keys = keys


def test_sibling_experiments():
    gender = _load("debias_gender")
    assert gender.target.attributes == ("gender",) and gender.model.classifier_heads == (("gender", 2),)
    assert "CelebA" in gender.model.classifier_path
    assert gender.data.prompt_repeats.to_dict() == {"occupation": 1, "occupation_w_style_and_context": 0,
                                                     "personal_descriptor": 0, "sports": 0}
    race = _load("debias_race")
    assert race.target.attributes == ("race",) and race.loss.weight_img == 6.0
    age = _load("debias_gender_race_age")
    assert age.target.attributes == ("gender", "race", "age") and age.target.marginals.age == (0.75, 0.25)
    assert dict(age.model.classifier_heads) == {"gender": 2, "race": 4, "age": 2}
    # The miniature gender x age run: the JAX-trained classifier's 8 logits, age weighted as in the age experiment,
    # and the classifier config's export is where the debiasing config reads it from.
    mini_age = _load("miniature_gender_age")
    assert mini_age.target.attributes == ("gender", "age") and mini_age.target.marginals.age == (0.5, 0.5)
    assert dict(mini_age.model.classifier_heads) == dict(_load("classifier_miniature").model.heads)
    assert set(mini_age.loss.factor1) == set(mini_age.loss.factor2) == {"gender", "age"}
    assert mini_age.model.classifier_path == f"{_load('classifier_miniature').workdir}/export/classifier.pt"
    # The longer miniature run: the demo's recipe with the learning rate decayed over all of its steps.
    long, demo = _load("miniature_long"), _load("miniature")
    assert long.optim.decay_steps == long.train.max_steps == 384 and demo.optim.decay_steps == 0
    assert long.optim.learning_rate == demo.optim.learning_rate and long.train.images_per_prompt == 40


def test_overrides_parse_to_the_key_types_and_move_references():
    c = _load(
        "debias_unet",
        "optim.learning_rate=1e-4", "lora.train_text_encoder=true", "train.micro_batch_size=2",
        "loss.factor1.race=0.5", "target.attributes=('gender',)", "seed=7", "assets_dir=/mnt/assets",
        "name=my_run",
    )
    assert c.optim.learning_rate == 1e-4 and c.lora.train_text_encoder is True and c.train.micro_batch_size == 2
    assert c.loss.factor1.race == 0.5 and c.target.attributes == ("gender",)
    assert c.data.shuffle_seed == 8  # follows seed
    assert c.model.sd_path == "/mnt/assets/stable-diffusion-v1-5" and c.model.dinov2_path.startswith("/mnt/assets/")
    assert c.workdir == "workdirs/my_run"
    assert _load("debias_unet", "model.sd_path=/elsewhere/sd").model.sd_path == "/elsewhere/sd"


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.lr=1e-4", "'optim.lr'"),  # near miss of learning_rate
        ("optimizer.learning_rate=1", "'optimizer'"),
        ("seed.value=1", "'seed.value'"),  # below a leaf
        ("loss.factor1.age=0.5", "'loss.factor1.age'"),  # not an attribute of this experiment
    ],
)
def test_unknown_keys_fail_by_name(override, named):
    with pytest.raises(config_cli.ConfigError, match="unknown config key") as error:
        _load("debias_text_encoder", override)
    assert named in str(error.value)


def test_bad_values_and_files_fail_clearly():
    with pytest.raises(config_cli.ConfigError, match="config.train.max_steps"):
        _load("debias_text_encoder", "train.max_steps=many")
    with pytest.raises(config_cli.ConfigError, match="no_such_config.py"):
        config_cli.load_config(str(ROOT / "configs" / "no_such_config.py"))
    with pytest.raises(config_cli.ConfigError, match="no config file"):
        config_cli.parse_config_args(["prog", "--config.seed=1"])
    with pytest.raises(config_cli.ConfigError, match="workdirr"):
        config_cli.parse_config_args(["prog", "--config", str(CONFIGS[0]), "--workdirr=/x"])


def test_parse_config_args_accepts_both_flag_forms_and_returns_positionals():
    config, positional = config_cli.parse_config_args(
        ["prog", "--config", str(ROOT / "configs/debias_unet.py"), "--config.train.max_steps", "10", "extra"])
    assert config.train.max_steps == 10 and positional == ["extra"]


def test_command_line_rejects_an_unknown_key_before_running_anything():
    result = subprocess.run(
        [sys.executable, "-m", "fairdiff_jax.config_cli", "--config", "configs/debias_text_encoder.py",
         "--config.train.max_step=10"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "unknown config key 'train.max_step'" in result.stderr
    assert "max_steps" in result.stderr  # the keys that do exist are listed


def test_tpu_vm_script_parses_and_launches_on_all_workers(tmp_path):
    script = ROOT / "scripts" / "tpu_vm.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake_gcloud = tmp_path / "gcloud"  # records its arguments instead of calling Google Cloud
    fake_gcloud.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$GCLOUD_LOG"\n')
    fake_gcloud.chmod(fake_gcloud.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", GCLOUD_LOG=str(log), WORKDIR="gs://b/run",
               CONFIG="configs/debias_unet.py")
    result = subprocess.run(["bash", str(script), "train", "--config.optim.learning_rate=1e-4"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calls = log.read_text()
    assert "ssh" in calls and "--worker=all" in calls
    command = next(line for line in calls.splitlines() if line.startswith("--command="))
    assert "FAIRDIFF_MULTI_PROCESS=1" in command and "python -m fairdiff_jax.train" in command
    assert "--config configs/debias_unet.py --config.workdir=gs://b/run --config.optim.learning_rate=1e-4" in command


def test_prompt_settings_fit_the_prompts_module():
    from fairdiff_jax import prompts

    for path in CONFIGS:
        config = config_cli.load_config(str(path))
        files = {kind: ROOT / config.data.prompts_dir / f"{kind}.json" for kind in config.data.prompt_repeats}
        prompt_sets = prompts.load_prompt_sets(files)
        train = prompts.training_prompts(prompt_sets, config.data.prompt_repeats)
        occupation = prompt_sets["occupation"]
        num_occupation = len(occupation["prompt_templates_train"]) * len(occupation["occupations_train_set"])
        if config.data.prompt_repeats.sports:
            assert len(train) > num_occupation, path.stem
        else:
            assert len(train) == num_occupation, path.stem
        assert len(prompts.validation_prompts(prompt_sets, config.eval.prompts_per_kind)) == 4 * config.eval.prompts_per_kind
