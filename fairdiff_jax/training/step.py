"""One debiasing training step (docs/method.md#one-training-step): a host-side `prepare` that builds a typed
batch, and a pure, module-level loss that the data-parallel gradient step differentiates.

    stages = Stages(sd, judges, config, mesh, detector)            # training/stages.py
    train_step = make_train_step(stages)
    prepared = prepare(stages, state.params, frozen, prompt, num_steps, step, key)
        noise -> X (LoRA) and X0 (frozen) images -> faces of both (host, each host its own rows)
        -> classifier probs of X; preds, probs, CLIP, DINO, face features of X0 -> OT targets (host)
    state, metrics = train_step(state, prepared.constants, prepared.batch, key)
    logged = logged_terms(metrics["aux"])                            # every loss term, computed once

The global batch is the B = images_per_prompt images of one prompt, split over the mesh's 'data' axis.
Everything random is a function of (seed, step), never of the device layout: the noise of image i is
normal(fold_in(step_key, i)) with step_key = fold_in(the run's base key TrainState.rng, step); the OT draws
use numpy's default_rng([seed, step]); the denoising-step count default_rng([seed, step, 1]).

`debias_loss` differentiates X's sampling the adjusted-DFT way (so the gradient reaches the LoRA of the UNet and/or
the text encoder; config.train.dft_gradient: from the latents the no-gradient pass stored, or by regenerating X),
reuses the faces found on the no-gradient X (the same images), and returns the per-image
loss of `alignment.alignment_loss` with its per-image terms for the log.
"""

import functools
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import struct

from fairdiff_jax.judging import crops
from fairdiff_jax.judging import detection as detection_lib
from fairdiff_jax.judging import judges as judges_lib
from fairdiff_jax.sd import adjusted_dft
from fairdiff_jax.sd import lora as lora_lib
from fairdiff_jax.sd import sampler
from fairdiff_jax.sd.loader import StableDiffusion
from fairdiff_jax.training import alignment, ot_targets, parallel
from fairdiff_jax.training.stages import Stages, Text, encode_prompt, merged

# ---- the LoRA and the frozen weights --------------------------------------------------------------------


def init_lora(rng: jax.Array, sd: StableDiffusion, rank: int, train_text_encoder: bool, train_unet: bool) -> dict:
    """{'text_encoder': tree, 'unet': tree}, only the trained parts (lora.init; a pure function of rng)."""
    out = {}
    if train_text_encoder:
        params = sd.text_encoder_params
        out["text_encoder"] = lora_lib.init(jax.random.fold_in(rng, 0), params, lora_lib.select_targets(params, "text_encoder"), rank)
    if train_unet:
        params = sd.unet_params
        out["unet"] = lora_lib.init(jax.random.fold_in(rng, 1), params, lora_lib.select_targets(params, "unet"), rank)
    if not out:
        raise ValueError("nothing to train: set config.lora.train_text_encoder and/or config.lora.train_unet")
    return out


def frozen_weights(sd: StableDiffusion, judge_variables: dict) -> dict:
    """The replicated frozen pytree every stage reads: {'unet', 'vae', 'text_encoder', 'judges'}."""
    return {"unet": sd.unet_params, "vae": sd.vae_params, "text_encoder": sd.text_encoder_params, "judges": judge_variables}


# ---- what the gradient stage gets ---------------------------------------------------------------------------


@struct.dataclass
class StepBatch:
    """The per-image inputs of the gradient stage: leading axis B (the images of one prompt), split over 'data'.
    X are the LoRA model's images, X0 the frozen model's from the same noises; A debiased attributes.

    noise:            [B, h, w, 4] float32, the initial latents of X and X0.
    found:            [B] bool, X has a face.
    boxes:            [B, 4] X's face box [x_min, y_min, x_max, y_max] in pixels (-1 without a face).
    crop_boxes:       [B, 4] float, the square classifier crop around `boxes`.
    chip_from_image:  [B, 2, 3] float, the similarity transform aligning X's face (for the face features).
    targets:          [B, A] int32, the OT target class per attribute, -1 for none.
    original_preds:   [B, A] int32, X0's predicted class per attribute, -1 without a face.
    original_probs:   per attribute [B, K_a] float32, X0's class probabilities.
    original_found:   [B] bool, X0 has a face.  original_boxes: [B, 4] its box.
    original_clip, original_dino: [B, D] X0's CLIP / DINOv2 image features; original_face: [B, D] its face
                      feature (zeros without a face).
    final_latents:    [B, h, w, 4] float32, X's latents before the decode, and
    trajectory:       [B, n, h, w, 4] float32, the latents each denoising step of X started from: with
                      config.train.dft_gradient = "stored_trajectory" (~55 MB for 40 images x 21 steps), else None.
    """

    noise: jax.Array
    found: jax.Array
    boxes: jax.Array
    crop_boxes: jax.Array
    chip_from_image: jax.Array
    targets: jax.Array
    original_preds: jax.Array
    original_probs: tuple
    original_found: jax.Array
    original_boxes: jax.Array
    original_clip: jax.Array
    original_dino: jax.Array
    original_face: jax.Array
    final_latents: jax.Array | None = None
    trajectory: jax.Array | None = None


class StepConstants(NamedTuple):
    """The replicated inputs of the gradient stage: the frozen weights, the prompt and the step's schedule
    (`sampler.make_schedule`) with its adjusted-DFT gradient scales [num_steps]."""

    frozen: dict
    text: Text
    schedule: sampler.Schedule
    gradient_scales: jax.Array


class Prepared(NamedTuple):
    """One step's prepared inputs and what the log shows (numpy, whole batch on every host)."""

    batch: StepBatch
    constants: StepConstants
    images: np.ndarray  # X [B, H, W, 3] in [-1, 1]
    original_images: np.ndarray  # X0
    detections: detection_lib.FaceDetections  # faces of X
    original_detections: detection_lib.FaceDetections
    probs: list  # per attribute [B, K_a], of X
    original_probs: list
    targets: ot_targets.OTTargets


def prepare(
    stages: Stages, lora: dict, frozen: dict, prompt: str, num_steps: int, step: int, key: jax.Array,
    timings: dict | None = None,
) -> Prepared:
    """The no-gradient part of global step `step` (docs/method.md#one-training-step): the gradient stage's
    batch and constants, and what to log.

    key: the step's key (`step_key`); the noises are drawn from it, the OT labels from (seed, step).
    timings: if given, filled with the seconds of 'sampling', 'faces' (detection, chips, classifier and
    CLIP / DINO / face features of X0) and 'ot' (each part waits for its results: benchmarks only).
    """
    config, mesh = stages.config, stages.mesh
    clock = _Clock(timings)
    text = stages.tokenize(prompt)
    constants = StepConstants(frozen, text, *stages.schedule(num_steps))
    noise = stages.noise(key, config.train.images_per_prompt)
    chunk = config.train.generation_batch_size
    stored = config.train.dft_gradient == "stored_trajectory"
    images = stages.generate(lora, frozen, text, constants.schedule, noise, chunk, keep_trajectory=stored)
    images, *trajectory = images if stored else (images,)  # [final latents, trajectory] or []
    original_images = stages.generate({}, frozen, text, constants.schedule, noise, chunk)
    clock.lap("sampling", (images, original_images))
    detections, transforms = stages.detect(images)
    original_detections, original_transforms = stages.detect(original_images)
    probs, original_probs, original_features = stages.judge(
        frozen, images, original_images, detections, original_detections, original_transforms
    )
    probs, original_probs = ([np.asarray(p) for p in ps] for ps in parallel.gather_to_hosts((probs, original_probs)))
    clock.lap("faces", original_features)

    targets = ot_targets.optimal_transport_targets(
        probs, detections.found, np.random.default_rng([config.seed, step]), config.loss.ot_num_samples,
        config.loss.uncertainty_threshold, [config.target.marginals[a] for a in stages.judges.attributes],
    )
    clock.lap("ot")
    original_preds = [np.where(original_detections.found, p.argmax(-1), ot_targets.NO_TARGET) for p in original_probs]
    host_batch = dict(
        found=detections.found,
        boxes=detections.boxes,
        crop_boxes=stages.crop_boxes(detections.boxes),
        chip_from_image=transforms,
        targets=np.stack(targets.targets, axis=1).astype(np.int32),
        original_preds=np.stack(original_preds, axis=1).astype(np.int32),
        original_probs=tuple(p.astype(np.float32) for p in original_probs),
        original_found=original_detections.found,
        original_boxes=original_detections.boxes,
    )
    batch = StepBatch(
        noise=noise, **parallel.shard_global(host_batch, mesh),
        **{f"original_{name}": value for name, value in original_features.items()}, **dict(zip(("final_latents", "trajectory"), trajectory)),
    )
    images, original_images = (np.asarray(x) for x in parallel.gather_to_hosts((images, original_images)))
    return Prepared(batch, constants, images, original_images, detections, original_detections, probs, original_probs, targets)


# ---- the gradient stage ------------------------------------------------------------------------------------


def debias_loss(lora: dict, constants: StepConstants, batch: StepBatch, rng: jax.Array, *,
                sd: StableDiffusion, judges: judges_lib.Judges, config):
    """Per-image loss [m] of a micro-batch and its per-image terms {name: (values [m], present [m])}
    (`parallel.LossFn`; docs/method.md#the-loss). Pure: the models and `config` only fix static numbers.

    A new loss term is one more entry in `terms` (an `alignment.Term` with its weight from `config.loss`)."""
    del rng  # every random input is in the batch
    loss_config, attributes = config.loss, judges.attributes
    frozen, text = constants.frozen, constants.text
    judge_vars = frozen["judges"]
    cond, uncond = encode_prompt(sd, merged(frozen, lora, "text_encoder"), text)
    if config.train.dft_gradient == "stored_trajectory":  # docs/method.md#adjusted-direct-finetuning
        unet_lora = lora.get("unet", {})
        images = adjusted_dft.images_from_trajectory(
            sd.unet, lambda unet_lora: merged(frozen, {"unet": unet_lora} if unet_lora else {}, "unet"), unet_lora,
            sd.vae, frozen["vae"], constants.schedule, constants.gradient_scales, batch.trajectory, batch.final_latents,
            cond, uncond, config.model.guidance_scale, text.context_mask,
        )
    else:  # "rerun": regenerate X under remat
        images = adjusted_dft.sample_images_adjusted(
            sd.unet, merged(frozen, lora, "unet"), sd.vae, frozen["vae"], constants.schedule,
            constants.gradient_scales, batch.noise, cond, uncond, config.model.guidance_scale, text.context_mask,
        )
    found = batch.found
    targets = [batch.targets[:, a] for a in range(len(attributes))]
    original_preds = [batch.original_preds[:, a] for a in range(len(attributes))]
    factor1 = [loss_config.factor1[a] for a in attributes]
    factor2 = [loss_config.factor2[a] for a in attributes]

    chips = crops.face_chips(images, batch.crop_boxes, found, config.faces.size_face)
    logits = judges_lib.attribute_logits(judges, judge_vars, chips)
    aligned = crops.aligned_faces(images, batch.chip_from_image, found, config.faces.size_aligned_face)
    face_feats = judges_lib.face_features(judges, judge_vars, aligned)

    image_weights = alignment.dynamic_image_weights(targets, original_preds, found, factor1)
    region = alignment.face_region_intersection(batch.boxes, batch.original_boxes, found, batch.original_found)
    region_scale = alignment.face_region_gradient_scale(targets, original_preds, found, factor2)
    semantics_images = alignment.scale_face_region_gradient(images, region, region_scale)
    clip_feats = judges_lib.clip_features(judges, judge_vars, semantics_images)
    dino_feats = judges_lib.dino_features(judges, judge_vars, semantics_images)

    use_original = alignment.use_original_face_feature(targets, original_preds, batch.original_probs, loss_config.confidence_level)
    face_targets = alignment.face_feature_targets(face_feats, batch.original_face, judge_vars["face_bank"], use_original)
    terms = alignment.paper_terms(
        logits, targets, found, clip_feats, batch.original_clip, dino_feats, batch.original_dino,
        face_feats, face_targets, image_weights, loss_config.weight_img, loss_config.weight_face, attributes,
    )
    return alignment.alignment_loss(terms)


def make_train_step(stages: Stages):
    """Jitted `train_step(state, constants, batch, rng) -> (state, metrics)` of `debias_loss` over the stages'
    mesh (`parallel.make_train_step`); metrics["aux"] holds the per-image loss terms."""
    loss_fn = functools.partial(debias_loss, sd=stages.sd, judges=stages.judges, config=stages.config)
    return parallel.make_train_step(loss_fn, stages.mesh, stages.config.train.micro_batch_size)


def logged_terms(aux: dict) -> dict[str, float]:
    """Host-side means of the per-image loss terms over the images where each is present (absent ones left out)."""
    return alignment.term_means(parallel.gather_to_hosts(aux))


# ---- keys, step counts, timing ------------------------------------------------------------------------------


def step_key(state_rng: jax.Array, step: int) -> jax.Array:
    """The key of training step `step`: fold_in(the run's base key, from TrainState.rng, step)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state_rng), step)


def denoising_steps_of(seed: int, step: int, min_steps: int, max_steps: int) -> int:
    """The number of denoising steps of training step `step`: uniform in [min, max], the same on every host."""
    return int(np.random.default_rng([seed, step, 1]).integers(min_steps, max_steps + 1))


class _Clock:
    """Records the seconds between laps into a dict (after waiting for the given arrays); inert without one."""

    def __init__(self, timings: dict | None):
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str, wait_for: Any = None) -> None:
        if self.timings is None:
            return
        jax.block_until_ready(wait_for)
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.last = now
