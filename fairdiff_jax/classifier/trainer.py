"""Trains the Flax MobileNetV3-Large face-attribute classifier (fairdiff_jax/judging/mobilenet_v3.py) with
any set of heads, and exports what the debiasing configs load.

Reads top to bottom: config -> mesh -> data -> model and optimizer -> loop (checkpoints, metrics) -> export.

- Heads: config.model.heads, ((name, num_classes), ...); one last Linear of sum(num_classes) logits, the
  heads side by side in that order (the layout of the original's gender + race classifier, which the
  debiasing configs' `model.classifier_heads` describe). Loss: the sum over heads of the cross-entropy.
- Mesh: fairdiff_jax/training/parallel.py's 1-D 'data' mesh; state replicated, batch split over devices;
  BatchNorm's batch statistics are those of the global batch (the jitted step sees the whole batch).
- AdamW with linear warm-up and cosine decay (optax); augmentation in the step, on device: flips,
  brightness / contrast, blur and noise, what generated faces add to real ones.
- Checkpoints: orbax (fairdiff_jax/training/checkpoints.py) of the whole state with the data position; a
  rerun of the same command resumes from the newest intact one.
- BatchNorm statistics: recomputed after the last step, before evaluation and export, as exact averages over
  the first config.batch_norm.recompute_chips unaugmented training chips (fairdiff_jax/classifier/batch_norm.py:
  the torch build's recompute; the running averages of a 400-step run are stale). The checkpoints keep the
  running averages, so a resumed or repeated run recomputes the same statistics.
- Export (workdir/export/): `variables/` (an orbax checkpoint of {'params', 'batch_stats'}),
  `classifier.pt` (torchvision mobilenet_v3_large state dict: set config.model.classifier_path to it),
  `classifier.json` (heads, width, chip size, held-out metrics).
- Speed: images/s of the steps after the first (compilation), and the share of the wall time the loop
  waited for the input pipeline (the device's idle time from input); printed and stored in classifier.json.
"""

import json
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import torch
from ml_collections import config_dict

from fairdiff_jax.classifier import batch_norm
from fairdiff_jax.classifier import metrics as metrics_lib
from fairdiff_jax.classifier import pipeline
from fairdiff_jax.judging.mobilenet_v3 import MobileNetV3Large, torchvision_state_dict
from fairdiff_jax.training import checkpoints, parallel


@flax.struct.dataclass
class ClassifierState:
    """step: int32 []; params, batch_stats: the MobileNet's collections (float32); opt_state: AdamW's;
    rng: uint32 [2] raw key data (per-step keys fold in the step, so a resumed run draws the same numbers)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    rng: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def make_optimizer(optim: config_dict.ConfigDict) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim.learning_rate, max(1, int(optim.warmup_fraction * optim.steps)), optim.steps)
    return optax.adamw(schedule, weight_decay=optim.weight_decay)


def augment(key: jax.Array, chips: jax.Array) -> jax.Array:
    """chips [B, S, S, 3] in [-1, 1] -> the same, randomly flipped left-right (p 0.5), scaled by 0.8-1.15 and
    shifted per channel by +-0.1, 3x3 box-blurred (p 0.4) and given Gaussian noise of sigma up to 0.1."""
    keys = jax.random.split(key, 6)
    n = chips.shape[0]
    per_image = (n, 1, 1, 1)
    chips = jnp.where(jax.random.bernoulli(keys[0], 0.5, per_image), chips[:, :, ::-1], chips)
    chips = chips * (0.8 + 0.35 * jax.random.uniform(keys[1], per_image)) \
        + 0.2 * (jax.random.uniform(keys[2], (n, 1, 1, 3)) - 0.5)
    window = lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")  # noqa: E731
    blurred = window(chips) / window(jnp.ones_like(chips[:1, ..., :1]))  # mean over the pixels inside the image
    chips = jnp.where(jax.random.bernoulli(keys[3], 0.4, per_image), blurred, chips)
    sigma = 0.1 * jax.random.uniform(keys[4], per_image)
    return jnp.clip(chips + sigma * jax.random.normal(keys[5], chips.shape), -1.0, 1.0)


def to_chips(face_chips_uint8: jax.Array) -> jax.Array:
    """[B, S, S, 3] uint8 -> float32 in [-1, 1], the generator's range the classifier reads."""
    return face_chips_uint8.astype(jnp.float32) / 127.5 - 1.0


def summed_cross_entropy(heads, logits: jax.Array, batch: dict, mask: jax.Array) -> jax.Array:
    """Sum over heads of the mean (over unmasked rows) cross-entropy of that head's logits."""
    weight = mask.astype(jnp.float32) / jnp.maximum(mask.sum(), 1)
    return sum(jnp.sum(weight * optax.softmax_cross_entropy_with_integer_labels(logits[:, columns], batch[name]))
               for name, columns in metrics_lib.head_slices(heads).items())


def make_steps(module: MobileNetV3Large, heads, use_augmentation: bool):
    """(train_step(state, batch) -> (state, metrics), eval_step(variables, batch) -> metrics), both jitted."""
    labels_of = lambda batch: {name: batch[name] for name, _ in heads}  # noqa: E731

    def train_step(state: ClassifierState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        augment_key, dropout_key = jax.random.split(key)
        chips = to_chips(batch["face_chips"])
        if use_augmentation:
            chips = augment(augment_key, chips)
        mask = jnp.ones(chips.shape[0], bool)

        def loss_fn(params):
            logits, updates = module.apply({"params": params, "batch_stats": state.batch_stats}, chips, train=True,
                                           mutable=["batch_stats"], rngs={"dropout": dropout_key})
            return summed_cross_entropy(heads, logits, batch, mask), (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
        return state, metrics_lib.from_outputs(heads, logits, labels_of(batch), mask, loss)

    def eval_step(variables: dict, batch: dict):
        logits = module.apply(variables, to_chips(batch["face_chips"]))
        loss = summed_cross_entropy(heads, logits, batch, batch["mask"])
        return metrics_lib.from_outputs(heads, logits, labels_of(batch), batch["mask"], loss)

    return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def evaluate(eval_step, variables: dict, builder, split: str, heads, batch_size: int, mesh) -> dict[str, float]:
    """The metrics of `variables` over the whole `split` (every process reads its share)."""
    merged = None
    for batch in pipeline.eval_batches(builder, split, heads, batch_size // jax.process_count()):
        merged = metrics_lib.merge(merged, eval_step(variables, parallel.shard_batch(batch, mesh)))
    if merged is None:
        raise ValueError(f"split {split!r} of {builder.info.full_name} is empty")
    return metrics_lib.compute(heads, merged)


def initial_state(module: MobileNetV3Large, config: config_dict.ConfigDict) -> ClassifierState:
    size = config.data.builder_config.size_face
    variables = jax.jit(module.init)(jax.random.key(config.seed), jnp.zeros((1, size, size, 3), jnp.float32))
    tx = make_optimizer(config.optim)
    return ClassifierState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                           rng=jax.random.key_data(jax.random.key(config.seed + 1)), tx=tx)


def recomputed_variables(module: MobileNetV3Large, variables: dict, builder, config: config_dict.ConfigDict,
                         mesh) -> tuple[dict, dict]:
    """(variables with BatchNorm statistics averaged over the training chips, what the report records).
    config.batch_norm.recompute_chips 0 keeps the running averages."""
    chips, batch_size = config.batch_norm.recompute_chips, config.batch_norm.recompute_batch_size
    if not chips:
        return variables, {"recomputed": False}
    began = time.perf_counter()
    batches = pipeline.statistics_batches(builder, config.data.train_split, chips // jax.process_count(),
                                          batch_size // jax.process_count(), len(mesh.local_devices))
    variables, counts = batch_norm.recompute_batch_stats(module, variables, batches, mesh, to_input=to_chips)
    report = {"recomputed": True, **counts, "batch_size": batch_size,
              "seconds": round(time.perf_counter() - began, 1)}
    print(f"BatchNorm statistics recomputed: {report}", flush=True)
    return variables, report


def export(workdir: Path, module: MobileNetV3Large, variables: dict, config: config_dict.ConfigDict,
           report: dict) -> Path:
    """workdir/export/{variables (orbax), classifier.pt (torchvision), classifier.json}; returns the folder."""
    out = workdir / "export"
    out.mkdir(parents=True, exist_ok=True)
    host_variables = jax.device_get(variables)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((out / "variables").absolute(), host_variables, force=True)
    if jax.process_index() == 0:
        torch.save(torchvision_state_dict(host_variables), out / "classifier.pt")
        description = {"heads": [list(h) for h in config.model.heads], "width_mult": module.width_mult,
                       "size_face": config.data.builder_config.size_face, **report}
        (out / "classifier.json").write_text(json.dumps(description, indent=2) + "\n")
    return out


def train_and_export(config: config_dict.ConfigDict) -> dict:
    """Runs (or resumes) the training the config describes; returns the report written to classifier.json."""
    workdir = Path(config.workdir).absolute()  # orbax wants absolute checkpoint paths
    workdir.mkdir(parents=True, exist_ok=True)
    heads = tuple((str(name), int(k)) for name, k in config.model.heads)
    mesh = parallel.make_mesh()
    if config.optim.batch_size % mesh.devices.size:
        raise ValueError(f"config.optim.batch_size {config.optim.batch_size} does not split over {mesh.devices.size} devices")

    builder = pipeline.make_builder(config.data)
    module = MobileNetV3Large(sum(k for _, k in heads), width_mult=config.model.width_mult)
    state = parallel.replicate(initial_state(module, config), mesh)
    train_step, eval_step = make_steps(module, heads, config.augment)

    from clu import metric_writers

    writer = metric_writers.create_default_writer(str(workdir / "tensorboard"), just_logging=jax.process_index() > 0,
                                                  asynchronous=False)
    with checkpoints.Checkpointer(workdir / "checkpoints", every_steps=config.checkpoint_every, keep=2,
                                  permanent_every_steps=None) as checkpointer:
        resumed = checkpointer.restore_newest_intact(checkpoints.abstract_like(state))
        if resumed is not None:
            _, state, position = resumed
            print(f"resumed from step {position['step']} ({workdir / 'checkpoints'})", flush=True)
        start = int(jax.device_get(state.step))
        batches = pipeline.train_batches(builder, config.data.train_split, heads,
                                         config.optim.batch_size // jax.process_count(), config.data.shuffle_seed,
                                         config.data.shuffle_buffer, start_step=start)
        merged, waited, timed_steps, began = None, 0.0, 0, None
        for step in range(start, config.optim.steps):
            before = time.perf_counter()
            batch = parallel.shard_batch(next(batches), mesh)
            if began is not None:  # the first step compiles: it counts for neither time
                waited += time.perf_counter() - before
                timed_steps += 1
            state, batch_metrics = train_step(state, batch)
            merged = metrics_lib.merge(merged, batch_metrics)
            if began is None:
                jax.block_until_ready(state.step)
                began = time.perf_counter()
            done = step + 1
            checkpointer.save(state, {"step": done}, force=done == config.optim.steps)
            if done % config.log_every == 0 or done == config.optim.steps:
                values = metrics_lib.compute(heads, merged)
                writer.write_scalars(done, {f"train/{k}": v for k, v in values.items()})
                print(f"step {done}/{config.optim.steps}: " + " ".join(
                    f"{k} {v:.3f}" for k, v in values.items() if "/" not in k), flush=True)
                merged = None
        jax.block_until_ready(state.step)
        elapsed = time.perf_counter() - began if began is not None else 0.0

    report: dict = {"steps": config.optim.steps, "batch_size": config.optim.batch_size}
    if timed_steps:
        report["speed"] = {"images_per_s": round(timed_steps * config.optim.batch_size / elapsed, 1),
                           "input_wait_fraction": round(waited / elapsed, 4), "timed_steps": timed_steps,
                           "devices": mesh.devices.size}
        print(f"speed: {report['speed']}", flush=True)
    variables, report["batch_norm"] = recomputed_variables(module, state.variables, builder, config, mesh)
    report["held_out"] = {}
    for split in config.data.eval_splits:
        values = evaluate(eval_step, variables, builder, split, heads, config.eval_batch_size, mesh)
        writer.write_scalars(int(jax.device_get(state.step)), {f"{split}/{k}": v for k, v in values.items()})
        report["held_out"][split] = values
        print(f"{split}: " + " ".join(f"{k} {v:.4f}" for k, v in values.items()), flush=True)
    writer.close()
    out = export(workdir, module, variables, config, report)
    print(f"exported {out / 'classifier.pt'} and {out / 'variables'}", flush=True)
    return report
