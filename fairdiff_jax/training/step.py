"""One debiasing training step (SPEC 5) as jitted device stages and host stages between them.

    stages = Stages(sd, judges, settings, mesh)
    batch  = stages.prepare(state, frozen, prompt, num_steps, step)      # host + device, no gradient:
        noise -> X (LoRA) and X0 (frozen) images -> faces of both (host, each host its own shard)
        -> chips, aligned faces, classifier probs of X; preds, probs, CLIP, DINO, face features of X0
        -> OT targets over the whole batch (host)
    state, metrics = stages.train_step(state, frozen, batch.inputs, rng) # device, with gradient

The global batch is the B = images_per_prompt images of one prompt, split over the mesh's 'data' axis.
Everything random is a function of (seed, step), never of the device layout: the noise of image i is
normal(fold_in(step_key, i)) with step_key = fold_in(the run's base key TrainState.rng, step); the OT draws
use numpy's default_rng([seed, step]); the denoising-step count default_rng([seed, step, 1]).

The gradient stage differentiates X's sampling the adjusted-DFT way (DFT_GRADIENTS: from the latents the
no-gradient pass stored, or by regenerating X; merged LoRA for the UNet and/or the text encoder; with a
text-encoder LoRA the prompt is re-encoded inside the loss so the gradient reaches it), reuses the faces found
on the no-gradient X (the same images), and sums per image: the fairness
cross-entropies, weight_img * w_i * ((1 - cos CLIP) + (1 - cos DINO)) with the face-region gradient scale
on the CLIP/DINO path only, and weight_face * the face-realism term (alignment.alignment_loss).

Text is padded to the tokenizer's maximum length (77) with a context mask (stable_diffusion), so each stage
compiles once per denoising-step count, whatever the prompt.
"""

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fairdiff_jax.judging import crops
from fairdiff_jax.judging import detection as detection_lib
from fairdiff_jax.judging import judges as judges_lib
from fairdiff_jax.sd import lora as lora_lib
from fairdiff_jax.sd import sampler
from fairdiff_jax.sd.loader import StableDiffusion, encode_text, tokenize_prompt_pair
from fairdiff_jax.training import alignment, parallel


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static numbers of a step (from the config; `settings_from_config`)."""

    seed: int
    images_per_prompt: int
    micro_batch_size: int
    generation_batch_size: int
    guidance_scale: float
    train_text_encoder: bool
    train_unet: bool
    size_face: int
    size_aligned_face: int
    expand_coef: float
    factor1: tuple[float, ...]  # per debiased attribute
    factor2: tuple[float, ...]
    weight_img: float
    weight_face: float
    confidence_level: float
    uncertainty_threshold: float
    ot_num_samples: int
    target_marginals: tuple[tuple[float, ...], ...]
    dft_gradient: str = "stored_trajectory"  # or "rerun" (DFT_GRADIENTS)


# How the gradient stage differentiates the sampler (config.train.dft_gradient):
#   "stored_trajectory": from the latents the no-gradient pass with the LoRA stored (sampler.images_from_trajectory):
#     per denoising step one VJP of the UNet call at its stored input, no forward re-run of the chain;
#   "rerun": sampler.sample_images_adjusted regenerates the images under jax.checkpoint, then differentiates.
# Same gradients (tests/test_stored_trajectory.py); "rerun" is kept for comparison.
DFT_GRADIENTS = ("stored_trajectory", "rerun")


def settings_from_config(config) -> Settings:
    attributes = tuple(config.target.attributes)
    _, _, expand_coef = judges_lib.detector_spec(config)
    dft_gradient = str(config.train.dft_gradient)
    if dft_gradient not in DFT_GRADIENTS:
        raise ValueError(f"config.train.dft_gradient = {dft_gradient!r}: expected one of {DFT_GRADIENTS}")
    return Settings(
        seed=int(config.seed),
        images_per_prompt=int(config.train.images_per_prompt),
        micro_batch_size=int(config.train.micro_batch_size),
        generation_batch_size=int(config.train.generation_batch_size),
        guidance_scale=float(config.model.guidance_scale),
        train_text_encoder=bool(config.lora.train_text_encoder),
        train_unet=bool(config.lora.train_unet),
        size_face=int(config.faces.size_face),
        size_aligned_face=int(config.faces.size_aligned_face),
        expand_coef=expand_coef,
        factor1=tuple(float(config.loss.factor1[a]) for a in attributes),
        factor2=tuple(float(config.loss.factor2[a]) for a in attributes),
        weight_img=float(config.loss.weight_img),
        weight_face=float(config.loss.weight_face),
        confidence_level=float(config.loss.confidence_level),
        uncertainty_threshold=float(config.loss.uncertainty_threshold),
        ot_num_samples=int(config.loss.ot_num_samples),
        target_marginals=tuple(tuple(float(v) for v in config.target.marginals[a]) for a in attributes),
        dft_gradient=dft_gradient,
    )


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


def merged(frozen: dict, lora: dict, part: str) -> Any:
    """The frozen params of `part` ('unet' / 'text_encoder') with its LoRA merged when there is one."""
    return lora_lib.merge(frozen[part], lora[part]) if part in lora else frozen[part]


class Text(NamedTuple):
    """A prompt tokenized at the fixed length T (replicated arrays): input_ids, attention_mask [2, T] int32
    (row 0 the empty negative prompt), context_mask [1, T] int32."""

    input_ids: Any
    attention_mask: Any
    context_mask: Any


# ---- the batch the gradient stage gets ------------------------------------------------------------------


class Prepared(NamedTuple):
    """What the no-gradient stages found; `inputs` is the gradient stage's batch ([B, ...], split over 'data')."""

    inputs: dict
    text: Text
    num_steps: int
    images: np.ndarray  # X [B, H, W, 3], whole batch on every host (logging)
    original_images: np.ndarray
    detections: detection_lib.FaceDetections  # faces of X, whole batch
    original_detections: detection_lib.FaceDetections
    probs: list  # per attribute [B, K_a] numpy, of X
    original_probs: list
    targets: alignment.OTTargets


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


class Stages:
    """The jitted stages of a step for one model set and mesh (compiled lazily, once per step count)."""

    def __init__(self, sd: StableDiffusion, judges: judges_lib.Judges, settings: Settings, mesh: Mesh, detector):
        self.sd = sd
        self.judges = judges
        self.settings = settings
        self.mesh = mesh
        self.detector = detector
        self.num_devices = mesh.shape[parallel.DATA_AXIS]
        if settings.images_per_prompt % self.num_devices:
            raise ValueError(
                f"config.train.images_per_prompt = {settings.images_per_prompt} does not split over {self.num_devices} devices"
            )
        self.text_length = sd.tokenizer.model_max_length
        self._noise = jax.jit(self._noise_fn, static_argnums=(1,), out_shardings=parallel.data_sharded(mesh))
        self._generate = jax.jit(self._generate_fn, static_argnames=("chunk", "keep_trajectory"))
        self._judge = jax.jit(self._judge_fn)
        self._probs = jax.jit(self._probs_fn)
        self.train_step = parallel.make_train_step(self._loss_fn, mesh, settings.micro_batch_size)

    # -- host helpers ------------------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> Text:
        ids, attention, context = tokenize_prompt_pair(self.sd.tokenizer, prompt, pad_to=self.text_length)
        return Text(*parallel.replicate((ids, attention, context), self.mesh))

    def noise(self, key: jax.Array, batch_size: int) -> jax.Array:
        """[batch_size, h, w, 4] float32 split over 'data'; row i = normal(fold_in(key, i)) whatever the mesh."""
        return self._noise(key, batch_size)

    def _noise_fn(self, key, batch_size):
        shape = self.sd.latent_shape
        return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(jnp.arange(batch_size))

    def detect(self, images: jax.Array) -> tuple[detection_lib.FaceDetections, np.ndarray]:
        """Faces of data-sharded images, each host detecting its own rows; -> (whole-batch detections,
        chip_from_image [B, 2, 3]) as numpy on every host."""
        local = self.detector.detect(parallel.host_local(images, self.mesh))
        local_transforms = crops.similarity_transforms(local.landmarks, local.found)
        gathered = parallel.gather_to_hosts((dataclasses.astuple(local), local_transforms))
        fields, transforms = gathered
        return detection_lib.FaceDetections(*[np.asarray(f) for f in fields]), np.asarray(transforms)

    # -- device stages -----------------------------------------------------------------------------------

    def _encode(self, text_encoder_params, text: Text):
        hidden = encode_text(self.sd.text_encoder, text_encoder_params, text.input_ids, text.attention_mask)
        return hidden[1:], hidden[:1]

    def _sample(self, unet_params, text_encoder_params, frozen, text, schedule, noise, chunk, keep_trajectory):
        """Images of noise [b, ...] in lax.map chunks of `chunk` (bounds the sampler's memory); with keep_trajectory
        (images, final latents, trajectory) as sampler.sample_images_and_trajectory returns them."""
        cond, uncond = self._encode(text_encoder_params, text)
        sample = sampler.sample_images_and_trajectory if keep_trajectory else sampler.sample_images

        def one(chunk_noise):
            return sample(
                self.sd.unet, unet_params, self.sd.vae, frozen["vae"], schedule, chunk_noise, cond, uncond,
                self.settings.guidance_scale, text.context_mask,
            )

        b = noise.shape[0]
        outputs = jax.lax.map(one, noise.reshape((b // chunk, chunk) + noise.shape[1:]))
        return jax.tree.map(lambda x: x.reshape((b,) + x.shape[2:]), outputs)

    def _generate_fn(self, lora, frozen, text, schedule, noise, chunk, keep_trajectory=False):
        """-> images of `lora` (a dict with the trained parts, {} for the frozen model), split over 'data'."""

        def per_device(lora, frozen, text, schedule, noise):
            unet_params = merged(frozen, lora, "unet")
            text_encoder_params = merged(frozen, lora, "text_encoder")
            return self._sample(unet_params, text_encoder_params, frozen, text, schedule, noise, chunk, keep_trajectory)

        return jax.shard_map(
            per_device, mesh=self.mesh, in_specs=(P(), P(), P(), P(), P(parallel.DATA_AXIS)), out_specs=P(parallel.DATA_AXIS)
        )(lora, frozen, text, schedule, noise)

    def generate(self, lora: dict, frozen: dict, text: Text, schedule: sampler.Schedule, noise: jax.Array, chunk: int,
                 keep_trajectory: bool = False):
        """Images [B, H, W, 3] in [-1, 1] of `lora` ({} = frozen), no gradient, split over 'data'; with keep_trajectory
        (images, final latents [B, h, w, 4], trajectory [B, n, h, w, 4]) for the stored-trajectory gradient."""
        local = noise.shape[0] // self.num_devices
        return self._generate(lora, frozen, text, schedule, noise, chunk=_largest_divisor_at_most(local, chunk),
                              keep_trajectory=keep_trajectory)

    def _chips(self, images, boxes, found):
        crop_boxes = crops.square_boxes(boxes, self.settings.expand_coef)
        return crops.face_chips(images, crop_boxes, found, self.settings.size_face)

    def _probs_fn(self, judge_vars, images, boxes, found):
        return judges_lib.attribute_probs(self.judges, judge_vars, self._chips(images, boxes, found))

    def attribute_probs(self, frozen: dict, images: jax.Array, detections: detection_lib.FaceDetections) -> list[np.ndarray]:
        """Classifier probabilities of the largest faces, per attribute [B, K_a] numpy (whole batch)."""
        boxes, found = _put_global((detections.boxes, detections.found), self.mesh)
        return [np.asarray(p) for p in parallel.gather_to_hosts(self._probs(frozen["judges"], images, boxes, found))]

    def _judge_fn(self, judge_vars, images, original_images, boxes, found, original_boxes, original_found, original_transforms):
        probs = self._probs_fn(judge_vars, images, boxes, found)
        original_probs = self._probs_fn(judge_vars, original_images, original_boxes, original_found)
        aligned = crops.aligned_faces(original_images, original_transforms, original_found, self.settings.size_aligned_face)
        features = dict(
            clip=judges_lib.clip_features(self.judges, judge_vars, original_images),
            dino=judges_lib.dino_features(self.judges, judge_vars, original_images),
            face=judges_lib.face_features(self.judges, judge_vars, aligned),
        )
        return probs, original_probs, features

    # -- one step's no-gradient part -----------------------------------------------------------------------

    def prepare(
        self, lora: dict, frozen: dict, prompt: str, num_steps: int, step: int, key: jax.Array, timings: dict | None = None
    ) -> Prepared:
        """Stages 1-6 of SPEC 5 for global step `step`: the gradient stage's batch and what to log.

        key: the step's key (`step_key`); the noises are drawn from it, the OT labels from (seed, step).
        timings: if given, filled with the seconds of 'sampling', 'faces' (detection, chips, classifier and
        CLIP / DINO / SFNet features of X0) and 'ot' (each part waits for its results: benchmarks only).
        """
        s = self.settings
        clock = _Clock(timings)
        text = self.tokenize(prompt)
        schedule = parallel.replicate(sampler.make_schedule(self.sd.scheduler_config, num_steps), self.mesh)
        noise = self.noise(key, s.images_per_prompt)
        stored = s.dft_gradient == "stored_trajectory"
        images = self.generate(lora, frozen, text, schedule, noise, s.generation_batch_size, keep_trajectory=stored)
        if stored:  # the gradient stage differentiates from this run's latents (~55 MB for 40 images x 21 steps)
            images, final_latents, trajectory = images
        original_images = self.generate({}, frozen, text, schedule, noise, s.generation_batch_size)
        clock.lap("sampling", (images, original_images))
        found_faces, transforms = self.detect(images)
        found_original, original_transforms = self.detect(original_images)
        boxes, found, original_boxes, original_found, original_transforms_dev = _put_global(
            (found_faces.boxes, found_faces.found, found_original.boxes, found_original.found, original_transforms), self.mesh
        )
        probs, original_probs, original_features = self._judge(
            frozen["judges"], images, original_images, boxes, found, original_boxes, original_found, original_transforms_dev
        )
        probs_np = [np.asarray(p) for p in parallel.gather_to_hosts(probs)]
        original_probs_np = [np.asarray(p) for p in parallel.gather_to_hosts(original_probs)]
        clock.lap("faces", original_features)

        targets = alignment.optimal_transport_targets(
            probs_np, found_faces.found, np.random.default_rng([s.seed, step]), s.ot_num_samples,
            s.uncertainty_threshold, s.target_marginals,
        )
        clock.lap("ot")
        original_preds = np.stack(
            [np.where(found_original.found, p.argmax(-1), alignment.NO_TARGET) for p in original_probs_np], axis=1
        )
        crop_boxes = np.asarray(crops.square_boxes(found_faces.boxes, s.expand_coef))
        host_inputs = dict(
            crop_boxes=crop_boxes,
            found=found_faces.found,
            boxes=found_faces.boxes,
            chip_from_image=transforms,
            targets=np.stack(targets.targets, axis=1).astype(np.int32),
            original_preds=original_preds.astype(np.int32),
            original_probs=tuple(p.astype(np.float32) for p in original_probs_np),
            original_boxes=found_original.boxes,
            original_found=found_original.found,
        )
        inputs = dict(_put_global(host_inputs, self.mesh), noise=noise, **{f"original_{k}": v for k, v in original_features.items()})
        if stored:
            inputs.update(final_latents=final_latents, trajectory=trajectory)
        return Prepared(
            inputs=inputs, text=text, num_steps=num_steps,
            images=np.asarray(parallel.gather_to_hosts(images)),
            original_images=np.asarray(parallel.gather_to_hosts(original_images)),
            detections=found_faces, original_detections=found_original,
            probs=probs_np, original_probs=original_probs_np, targets=targets,
        )

    def shared(self, frozen: dict, prepared: Prepared) -> dict:
        """The replicated, per-step inputs of the gradient stage."""
        schedule = sampler.make_schedule(self.sd.scheduler_config, prepared.num_steps)
        scales = sampler.dft_gradient_scales(self.sd.scheduler_config, schedule)
        return dict(
            frozen=frozen, text=prepared.text,
            schedule=parallel.replicate(schedule, self.mesh), gradient_scales=parallel.replicate(scales, self.mesh),
        )

    # -- the gradient stage ----------------------------------------------------------------------------------

    def _loss_fn(self, lora, shared, batch, rng):
        """Per-image loss [m] and per-image logging terms of a micro-batch (parallel.LossFn)."""
        del rng  # every random input is in the batch
        s, judges = self.settings, self.judges
        frozen, text = shared["frozen"], shared["text"]
        judge_vars = frozen["judges"]
        cond, uncond = self._encode(merged(frozen, lora, "text_encoder"), text)
        if s.dft_gradient == "stored_trajectory":
            unet_lora = lora.get("unet", {})
            images = sampler.images_from_trajectory(
                self.sd.unet, lambda unet_lora: merged(frozen, {"unet": unet_lora} if unet_lora else {}, "unet"), unet_lora,
                self.sd.vae, frozen["vae"], shared["schedule"], shared["gradient_scales"], batch["trajectory"],
                batch["final_latents"], cond, uncond, s.guidance_scale, text.context_mask,
            )
        else:
            images = sampler.sample_images_adjusted(
                self.sd.unet, merged(frozen, lora, "unet"), self.sd.vae, frozen["vae"], shared["schedule"],
                shared["gradient_scales"], batch["noise"], cond, uncond, s.guidance_scale, text.context_mask,
            )
        found = batch["found"]
        targets = [batch["targets"][:, a] for a in range(len(judges.attributes))]
        original_preds = [batch["original_preds"][:, a] for a in range(len(judges.attributes))]

        chips = crops.face_chips(images, batch["crop_boxes"], found, s.size_face)
        logits = judges_lib.attribute_logits(judges, judge_vars, chips)
        aligned = crops.aligned_faces(images, batch["chip_from_image"], found, s.size_aligned_face)
        face_feats = judges_lib.face_features(judges, judge_vars, aligned)

        image_weights = alignment.dynamic_image_weights(targets, original_preds, found, s.factor1)
        region = alignment.face_region_intersection(batch["boxes"], batch["original_boxes"], found, batch["original_found"])
        region_scale = alignment.face_region_gradient_scale(targets, original_preds, found, s.factor2)
        semantics_images = alignment.scale_face_region_gradient(images, region, region_scale)
        clip_feats = judges_lib.clip_features(judges, judge_vars, semantics_images)
        dino_feats = judges_lib.dino_features(judges, judge_vars, semantics_images)

        use_original = alignment.use_original_face_feature(
            targets, original_preds, batch["original_probs"], s.confidence_level
        )
        face_targets = alignment.face_feature_targets(face_feats, batch["original_face"], judge_vars["face_bank"], use_original)
        per_image, _ = alignment.alignment_loss(
            logits, targets, found, clip_feats, batch["original_clip"], dino_feats, batch["original_dino"],
            face_feats, face_targets, image_weights, s.weight_img, s.weight_face, judges.attributes,
        )
        return per_image, _per_image_terms(logits, targets, found, clip_feats, batch, dino_feats, face_feats, face_targets, judges.attributes)


def _per_image_terms(logits, targets, found, clip_feats, batch, dino_feats, face_feats, face_targets, names) -> dict:
    """{term: ([m] value, [m] present)} for the log: the same term functions alignment_loss sums."""
    terms = {}
    for name, attribute_logits, target in zip(names, logits, targets):
        terms[f"loss_fair_{name}"] = alignment.fairness_cross_entropy(attribute_logits, target, found)
    clip_term, dino_term = alignment.image_semantics_terms(clip_feats, batch["original_clip"], dino_feats, batch["original_dino"])
    everywhere = jnp.ones_like(found)
    terms["loss_CLIP"] = (clip_term, everywhere)
    terms["loss_DINO"] = (dino_term, everywhere)
    terms["loss_face"] = (alignment.face_realism_term(face_feats, face_targets, found), found)
    return jax.lax.stop_gradient(terms)


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


def _put_global(tree: Any, mesh: Mesh) -> Any:
    """Whole-batch host arrays (the same on every host) -> global arrays split over 'data'."""
    sharding = parallel.data_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x)[index]), tree)


def logged_terms(aux: dict) -> dict[str, float]:
    """Host-side means of the per-image terms over the images where each is present (absent terms left out)."""
    out = {}
    for name, (values, present) in parallel.gather_to_hosts(aux).items():
        values, present = np.asarray(values, np.float64), np.asarray(present, bool)
        if present.any():
            out[name] = float(values[present].mean())
    return out


def step_key(state_rng: jax.Array, step: int) -> jax.Array:
    """The key of training step `step`: fold_in(the run's base key, from TrainState.rng, step)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state_rng), step)


def denoising_steps_of(seed: int, step: int, min_steps: int, max_steps: int) -> int:
    """The number of denoising steps of training step `step`: uniform in [min, max], the same on every host."""
    return int(np.random.default_rng([seed, step, 1]).integers(min_steps, max_steps + 1))
