"""A few debiasing steps in the miniature world (configs/miniature.py, the committed assets/miniature) lower the
gender x race gap of the training batch: the gradient of the distributional alignment loss points the right way.

Per seed: a fresh text-encoder LoRA (its own initialisation and noise), the gap of the images of one training
prompt, STEPS training steps on that prompt, then the gap of the images from the same initial noise again. The
original model draws this prompt's images from one or two joint classes (gap near its maximum of 0.25).
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from fairdiff_jax import config_cli
from fairdiff_jax.eval import bias
from fairdiff_jax.judging import judges as judges_lib
from fairdiff_jax.training import optim, parallel
from fairdiff_jax.training import step as debias_step
from fairdiff_jax.training.loop import load_models
from fairdiff_jax.training.stages import Stages

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of the face of a doctor, a person"
SEEDS = (0, 1)
STEPS = 8
DENOISING_STEPS = 8


@pytest.fixture(scope="module")
def world():
    config = config_cli.load_config(str(ROOT / "configs" / "miniature.py"), [
        f"assets_dir={ROOT / 'assets' / 'miniature'}",
        "train.images_per_prompt=16", "train.micro_batch_size=16", "train.generation_batch_size=16",
        # A step size that shows the direction within a few steps (the recipe itself uses 5e-3 over many).
        "optim.learning_rate=2e-2",
    ])
    sd, judges, judge_variables = load_models(config)
    mesh = parallel.make_mesh()
    stages = Stages(sd, judges, config, mesh, judges_lib.make_detector(config))
    frozen = parallel.replicate(debias_step.frozen_weights(sd, judge_variables), mesh)
    return config, sd, stages, frozen, mesh


def joint_gap(stages, prepared) -> float:
    return bias.bias_metrics(prepared.probs, prepared.detections.found, stages.judges.attributes)["gender_race_bias"]


def test_a_few_steps_lower_the_training_batch_gap(world):
    config, sd, stages, frozen, mesh = world
    o = config.optim
    train_step = debias_step.make_train_step(stages)
    before, after = [], []
    for seed in SEEDS:
        lora = debias_step.init_lora(jax.random.key(seed), sd, config.lora.rank, True, False)
        tx = optim.make_optimizer(o.learning_rate, o.b1, o.b2, o.eps, o.weight_decay)
        state = parallel.replicate(optim.create_train_state(lora, tx, o.ema_decay, seed), mesh)
        first_key = debias_step.step_key(state.rng, 0)
        prepared = debias_step.prepare(stages, state.params, frozen, PROMPT, DENOISING_STEPS, 0, first_key)
        before.append(joint_gap(stages, prepared))
        for step in range(STEPS):
            key = debias_step.step_key(state.rng, step)
            prepared = debias_step.prepare(stages, state.params, frozen, PROMPT, DENOISING_STEPS, step, key)
            state, logs = train_step(state, prepared.constants, prepared.batch, key)
            assert int(logs["skipped"]) == 0
        again = debias_step.prepare(stages, state.params, frozen, PROMPT, DENOISING_STEPS, 0, first_key)
        after.append(joint_gap(stages, again))
    print(f"gender x race gap before {before}, after {STEPS} steps {after}")
    assert min(before) > 0.2, "the original miniature model should be strongly biased on this prompt"
    assert np.mean(after) < np.mean(before) - 0.02
