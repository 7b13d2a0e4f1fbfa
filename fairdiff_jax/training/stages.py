"""The no-gradient device stages of a training step, jitted once per model set and mesh: tokenize the prompt,
draw the noises, generate images (with or without the LoRA), find faces, judge them.

    stages = Stages(sd, judges, config, mesh, detector)
    images = stages.generate(lora, frozen, stages.tokenize(prompt), schedule, stages.noise(key, B), chunk)

`training/step.py` strings these into the step's `prepare`; training's periodic evaluation reuses `noise`,
`tokenize` and `generate`. Every random input is a function of a key, never of the device layout: row i of
`noise(key, B)` is normal(fold_in(key, i)) on any mesh.

Text is padded to the tokenizer's maximum length (77) with a context mask, so each stage compiles once per
denoising-step count, whatever the prompt.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fairdiff_jax.judging import crops
from fairdiff_jax.judging import detection as detection_lib
from fairdiff_jax.judging import judges as judges_lib
from fairdiff_jax.sd import adjusted_dft
from fairdiff_jax.sd import lora as lora_lib
from fairdiff_jax.sd import sampler
from fairdiff_jax.sd.loader import StableDiffusion, encode_text, tokenize_prompt_pair
from fairdiff_jax.training import parallel


class Text(NamedTuple):
    """A prompt tokenized at the fixed length T (replicated arrays): input_ids, attention_mask [2, T] int32
    (row 0 the empty negative prompt), context_mask [1, T] int32."""

    input_ids: Any
    attention_mask: Any
    context_mask: Any


def merged(frozen: dict, lora: dict, part: str) -> Any:
    """The frozen params of `part` ('unet' / 'text_encoder') with its LoRA merged when there is one."""
    return lora_lib.merge(frozen[part], lora[part]) if part in lora else frozen[part]


def encode_prompt(sd: StableDiffusion, text_encoder_params, text: Text) -> tuple[jax.Array, jax.Array]:
    """(cond [1, T, D], uncond [1, T, D]) hidden states of the prompt and of the empty negative prompt."""
    hidden = encode_text(sd.text_encoder, text_encoder_params, text.input_ids, text.attention_mask)
    return hidden[1:], hidden[:1]


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


class Stages:
    """The jitted no-gradient stages for one model set and mesh (compiled lazily, once per step count).

    Reads from `config`: model.guidance_scale, faces.size_face / size_aligned_face, and the detector's crop
    expansion (`judges.detector_spec`).
    """

    def __init__(self, sd: StableDiffusion, judges: judges_lib.Judges, config, mesh: Mesh, detector):
        self.sd, self.judges, self.config, self.mesh, self.detector = sd, judges, config, mesh, detector
        self.num_devices = mesh.shape[parallel.DATA_AXIS]
        images_per_prompt = config.train.images_per_prompt
        if images_per_prompt % self.num_devices:
            raise ValueError(f"config.train.images_per_prompt = {images_per_prompt} does not split over {self.num_devices} devices")
        _, _, self.expand_coef = judges_lib.detector_spec(config)
        self.text_length = sd.tokenizer.model_max_length
        self._noise = jax.jit(self._noise_fn, static_argnums=(1,), out_shardings=parallel.data_sharded(mesh))
        self._generate = jax.jit(self._generate_fn, static_argnames=("chunk", "keep_trajectory"))
        self._judge = jax.jit(self._judge_fn)
        self._probs = jax.jit(self._probs_fn)
        self._square_boxes = jax.jit(crops.square_boxes)
        # Per prompt / step count, the same every step: computed and placed once (host work in every step otherwise).
        self._texts: dict[str, Text] = {}
        self._schedules: dict[int, tuple[sampler.Schedule, jax.Array]] = {}

    # -- host helpers ------------------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> Text:
        if prompt not in self._texts:
            ids, attention, context = tokenize_prompt_pair(self.sd.tokenizer, prompt, pad_to=self.text_length)
            self._texts[prompt] = Text(*parallel.replicate((ids, attention, context), self.mesh))
        return self._texts[prompt]

    def schedule(self, num_steps: int) -> tuple[sampler.Schedule, jax.Array]:
        """(`sampler.make_schedule`, its adjusted-DFT gradient scales [num_steps]), replicated over the mesh."""
        if num_steps not in self._schedules:
            schedule = sampler.make_schedule(self.sd.scheduler_config, num_steps)
            scales = adjusted_dft.dft_gradient_scales(self.sd.scheduler_config, schedule)
            self._schedules[num_steps] = parallel.replicate((schedule, scales), self.mesh)
        return self._schedules[num_steps]

    def crop_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """crops.square_boxes of [B, 4] host boxes with the detector's expansion, as numpy (one jitted call)."""
        return np.asarray(self._square_boxes(boxes, self.expand_coef))

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
        fields, transforms = parallel.gather_to_hosts((dataclasses.astuple(local), local_transforms))
        return detection_lib.FaceDetections(*[np.asarray(f) for f in fields]), np.asarray(transforms)

    # -- device stages -----------------------------------------------------------------------------------

    def _sample(self, unet_params, text_encoder_params, frozen, text, schedule, noise, chunk, keep_trajectory):
        """Images of noise [b, ...] in lax.map chunks of `chunk` (bounds the sampler's memory); with keep_trajectory
        (images, final latents, trajectory) as sampler.sample_images_and_trajectory returns them."""
        cond, uncond = encode_prompt(self.sd, text_encoder_params, text)
        sample = sampler.sample_images_and_trajectory if keep_trajectory else sampler.sample_images

        def one(chunk_noise):
            return sample(
                self.sd.unet, unet_params, self.sd.vae, frozen["vae"], schedule, chunk_noise, cond, uncond,
                self.config.model.guidance_scale, text.context_mask,
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
        return self._generate(lora, frozen, text, schedule, noise, chunk=largest_divisor_at_most(local, chunk),
                              keep_trajectory=keep_trajectory)

    def chips(self, images, boxes, found):
        """[B, size_face, size_face, 3] square face chips around the detected boxes (zeros without a face)."""
        crop_boxes = crops.square_boxes(boxes, self.expand_coef)
        return crops.face_chips(images, crop_boxes, found, self.config.faces.size_face)

    def _probs_fn(self, judge_vars, images, boxes, found):
        return judges_lib.attribute_probs(self.judges, judge_vars, self.chips(images, boxes, found))

    def attribute_probs(self, frozen: dict, images: jax.Array, detections: detection_lib.FaceDetections) -> list[np.ndarray]:
        """Classifier probabilities of the largest faces, per attribute [B, K_a] numpy (whole batch)."""
        boxes, found = parallel.shard_global((detections.boxes, detections.found), self.mesh)
        return [np.asarray(p) for p in parallel.gather_to_hosts(self._probs(frozen["judges"], images, boxes, found))]

    def _judge_fn(self, judge_vars, images, original_images, boxes, found, original_boxes, original_found, original_transforms):
        probs = self._probs_fn(judge_vars, images, boxes, found)
        original_probs = self._probs_fn(judge_vars, original_images, original_boxes, original_found)
        aligned = crops.aligned_faces(original_images, original_transforms, original_found, self.config.faces.size_aligned_face)
        features = dict(
            clip=judges_lib.clip_features(self.judges, judge_vars, original_images),
            dino=judges_lib.dino_features(self.judges, judge_vars, original_images),
            face=judges_lib.face_features(self.judges, judge_vars, aligned),
        )
        return probs, original_probs, features

    def judge(self, frozen: dict, images, original_images, detections, original_detections, original_transforms):
        """Classifier probs of X and X0 (per attribute [B, K_a], split over 'data') and X0's features
        {'clip', 'dino', 'face'} [B, D], from the whole-batch numpy detections."""
        placed = parallel.shard_global(
            (detections.boxes, detections.found, original_detections.boxes, original_detections.found, original_transforms),
            self.mesh,
        )
        return self._judge(frozen["judges"], images, original_images, *placed)
