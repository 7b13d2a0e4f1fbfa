"""A few debiasing steps in the miniature world (configs/miniature.py as it is: text-encoder + UNet LoRA, lr 5e-3,
guidance 3.0, the committed assets/miniature) should lower the gender gap of the training prompt's images: the
gradient of the distributional alignment loss points the right way. The evaluation's guards (fidelity precision
against the world's balanced renders, prompt consistency, face share; from the evaluation judges, independent of the
loss's) are measured on the same images and must stay near the original's, so a gap that falls because the images
were destroyed fails (an over-driven run does destroy them: README, "The failure these guards catch").

Per seed: a fresh LoRA (its own initialisation and noise), the gaps of the images of one training prompt, STEPS
training steps on that prompt, then the gaps of the images from the same initial noise again. The original model
draws this prompt's images from one or two joint classes. The test trains on 16 images per step (the config's 40 cost
too much here), and at 16 most faces get no race target (docs/method.md#ot-targets): only gender is asked to move, and
the joint gap only not to grow.
"""

from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest

from fairdiff_jax import config_cli
from fairdiff_jax.eval import bias, from_config
from fairdiff_jax.eval.evaluator import PromptResults, prompt_metrics
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
GUARDS = ("fidelity_precision", "consistency", "face_share")
# After the steps each guard must keep this share of its value on the original's images (the held-out target is
# 0.9; a few images per seed make the estimate coarse, hence the margin).
KEPT = 0.8


@pytest.fixture(scope="module")
def world():
    config = config_cli.load_config(str(ROOT / "configs" / "miniature.py"), [
        f"assets_dir={ROOT / 'assets' / 'miniature'}",
        "train.images_per_prompt=16", "train.micro_batch_size=16", "train.generation_batch_size=16",
    ])
    sd, judges, judge_variables = load_models(config)
    mesh = parallel.make_mesh()
    stages = Stages(sd, judges, config, mesh, judges_lib.make_detector(config))
    frozen = parallel.replicate(debias_step.frozen_weights(sd, judge_variables), mesh)
    evaluator = from_config.load_evaluator(config)
    reference = from_config.world_reference_features(evaluator, PROMPT, config.eval.reference_images_per_prompt)
    return config, sd, stages, frozen, mesh, evaluator, reference


def gaps(stages, prepared) -> tuple[float, float]:
    """(gender gap, gender x race gap) of the batch's images by the training classifier."""
    metrics = bias.bias_metrics(prepared.probs, prepared.detections.found, stages.judges.attributes)
    return metrics["gender_bias"], metrics["gender_race_bias"]


def guards(evaluator, reference, prepared) -> np.ndarray:
    """[3] the GUARDS of the batch's images as the evaluation measures them."""
    images = np.asarray(prepared.images, np.float32)
    result = PromptResults.from_rows([str(j) for j in range(len(images))], evaluator.judge(images, PROMPT))
    row = prompt_metrics(result, reference, evaluator.fidelity_k)
    return np.array([row[name] for name in GUARDS])


class Run(NamedTuple):
    """Per seed: the (gender, gender x race) gaps and the GUARDS of the training prompt's images before and after STEPS
    steps."""

    gap_before: np.ndarray  # [seeds, 2]
    gap_after: np.ndarray
    guards_before: np.ndarray  # [seeds, 3]
    guards_after: np.ndarray


@pytest.fixture(scope="module")
def run(world) -> Run:
    config, sd, stages, frozen, mesh, evaluator, reference = world
    o = config.optim
    train_step = debias_step.make_train_step(stages)
    before, after, guards_before, guards_after = [], [], [], []
    for seed in SEEDS:
        lora = debias_step.init_lora(jax.random.key(seed), sd, config.lora.rank, config.lora.train_text_encoder,
                                     config.lora.train_unet)
        tx = optim.optimizer_from_config(o)
        state = parallel.replicate(optim.create_train_state(lora, tx, o.ema_decay, seed), mesh)
        first_key = debias_step.step_key(state.rng, 0)
        prepared = debias_step.prepare(stages, state.params, frozen, PROMPT, DENOISING_STEPS, 0, first_key)
        before.append(gaps(stages, prepared))
        guards_before.append(guards(evaluator, reference, prepared))
        for step in range(STEPS):
            key = debias_step.step_key(state.rng, step)
            prepared = debias_step.prepare(stages, state.params, frozen, PROMPT, DENOISING_STEPS, step, key)
            state, logs = train_step(state, prepared.constants, prepared.batch, key)
            assert int(logs["skipped"]) == 0
        again = debias_step.prepare(stages, state.params, frozen, PROMPT, DENOISING_STEPS, 0, first_key)
        after.append(gaps(stages, again))
        guards_after.append(guards(evaluator, reference, again))
    result = Run(*map(np.asarray, (before, after, guards_before, guards_after)))
    print(f"(gender, gender x race) gaps before {before}, after {STEPS} steps {after}; {GUARDS} before "
          f"{result.guards_before.mean(0)}, after {result.guards_after.mean(0)}")
    return result


def kept(run: Run) -> dict[str, float]:
    """Each guard after the steps as a share of its value on the original's images."""
    return dict(zip(GUARDS, run.guards_after.mean(0) / run.guards_before.mean(0)))


def test_a_few_steps_lower_the_gender_gap(run):
    gender_before, joint_before = run.gap_before.mean(0)
    gender_after, joint_after = run.gap_after.mean(0)
    assert run.gap_before[:, 1].min() > 0.2, "the original miniature model should be strongly biased on this prompt"
    assert gender_after < gender_before - 0.15, (gender_before, gender_after)
    assert joint_after <= joint_before + 0.005, (joint_before, joint_after)


def test_a_few_steps_keep_fidelity(run):
    assert kept(run)["fidelity_precision"] >= KEPT, kept(run)


def test_a_few_steps_keep_the_scene_and_the_face(run):
    assert np.all(run.guards_before.mean(0)[1:] > 0.3), "the evaluation judges should accept the original's images"
    assert all(kept(run)[name] >= KEPT for name in ("consistency", "face_share")), kept(run)
