"""Debias Stable Diffusion by LoRA-finetuning with the distributional alignment loss (docs/method.md).

    python -m fairdiff_jax.train --config configs/debias_text_encoder.py --workdir workdirs/te [--resume] \\
        [--config.train.micro_batch_size=2 ...]

Reads top to bottom: config (checked, with every asset file and prompt file, before anything compiles),
multi-process start-up and mesh, prompts, frozen models, LoRA and optimizer state, checkpoints, loop.

Workdir: checkpoints/ (orbax; `python -m fairdiff_jax.export` turns a step into LoRA files),
metrics.jsonl (one JSON object per line: {"step", "kind": "train"|"eval", ...}), tensorboard/ (the same
scalars and the grids, through clu's metric writers, when clu + tensorflow-cpu are installed),
eval/step_<N>/<weights>/prompt_<i>.jpg (annotated grids per validation prompt), train_grids/step_<N>.jpg
(the training batch, X above X0, every train.plot_every_steps), config.json (the resolved config).

--resume continues from the newest checkpoint (LoRA, EMA, optimizer state, step, data position); everything
random is a function of (seed, step), so a resumed run ends with the same LoRA as an uninterrupted one.
Without --resume, a workdir that already holds checkpoints is refused.

What goes wrong is stopped, not carried along (README, "What happens when things go wrong"): config numbers are
checked before anything loads (exit 2); workdir/train.lock keeps a second run out (exit 2, naming the other
process); --resume refuses config values that differ from config.json unless --allow_config_change, falls back
to the newest checkpoint that reads (warning; damaged ones go to checkpoints_damaged/), and drops the metrics
lines it will log again; config.train.max_bad_steps non-finite or skipped steps in a row stop the run (exit 1) and
a NaN state is never checkpointed; a failed checkpoint save stops the run with its cause (exit 1).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fairdiff_jax import attributes as attributes_lib
from fairdiff_jax import config_checks, config_cli, prompts
from fairdiff_jax.eval import bias as bias_lib
from fairdiff_jax.eval import from_config as eval_setup
from fairdiff_jax.eval import grids as grids_lib
from fairdiff_jax.eval import periodic
from fairdiff_jax.judging import judges as judges_lib
from fairdiff_jax.sd.clip_text import load_clip_text
from fairdiff_jax.sd.loader import load_stable_diffusion
from fairdiff_jax.training import checkpoints, health, optim, ot_targets, parallel
from fairdiff_jax.training import workdir as workdir_lib
from fairdiff_jax.training import step as debias_step
from fairdiff_jax.training.stages import Stages


class InputError(ValueError):
    """A bad command line, config, asset or prompt file, found before anything compiles."""


# ---- inputs, checked before anything compiles ------------------------------------------------------------


def parse_args(argv: Sequence[str]):
    """-> (config, workdir Path, resume, allow_config_change). `--config.*` arguments go to config_cli, the rest here."""
    parser = argparse.ArgumentParser(prog="python -m fairdiff_jax.train", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="run folder (default: config.workdir)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the workdir")
    parser.add_argument("--allow_config_change", action="store_true",
                        help="with --resume: continue although config values differ from the run's config.json")
    args, config_args = parser.parse_known_args(list(argv[1:]))
    try:
        config, positional = config_cli.parse_config_args([argv[0]] + config_args)
    except config_cli.ConfigError as e:
        raise InputError(str(e)) from e
    if positional:
        raise InputError(f"unexpected arguments: {positional}")
    if args.workdir is not None and args.workdir.exists() and not args.workdir.is_dir():
        raise InputError(f"--workdir {args.workdir} is a file, not a folder")
    return config, args.workdir or Path(config.workdir), args.resume, args.allow_config_change


def load_prompt_lists(config) -> tuple[list[str], list[str]]:
    """(training prompts, validation prompts) from `config.data`; PromptFileError names a bad file and key."""
    folder = Path(config.data.prompts_dir)
    paths = {kind: folder / f"{kind}.json" for kind in prompts.PROMPT_KINDS}
    prompt_sets = prompts.load_prompt_sets(paths)
    repeats = {kind: int(config.data.prompt_repeats.get(kind, 0)) for kind in prompts.PROMPT_KINDS}
    return prompts.training_prompts(prompt_sets, repeats), prompts.validation_prompts(prompt_sets, config.eval.prompts_per_kind)


def check_inputs(config) -> tuple[list[str], list[str]]:
    """Every check that needs no device: asset files, prompt files, the numbers' consistency."""
    try:
        config_checks.check_numbers(config)
        judges_lib.check_asset_files(config)
        eval_setup.check_eval_assets(config)
        train_prompts, val_prompts = load_prompt_lists(config)
    except (OSError, ValueError) as e:
        raise InputError(str(e)) from e
    if not train_prompts:
        raise InputError("config.data.prompt_repeats leaves no training prompt")
    return train_prompts, val_prompts


# ---- models ----------------------------------------------------------------------------------------------


def load_models(config):
    """(StableDiffusion with a float32 text encoder, Judges, judge variables)."""
    dtype = jnp.dtype(config.model.dtype)
    sd = load_stable_diffusion(config.model.sd_path, dtype, attention_impl=config.model.attention_impl)
    # float32 text encoder: merged LoRA kernels in bf16 would lose the LoRA's small early updates (lora.py).
    text_encoder, text_encoder_params = load_clip_text(
        Path(config.model.sd_path) / "text_encoder", jnp.float32, jnp.float32, config.model.attention_impl
    )
    sd = dataclasses.replace(
        sd,
        # remat: the gradient stage recomputes each UNet / VAE block's activations instead of keeping them.
        unet=sd.unet.clone(remat=bool(config.model.remat)),
        vae=sd.vae.clone(remat=bool(config.model.remat)),
        text_encoder=text_encoder,
        text_encoder_params=jax.tree.map(jnp.asarray, text_encoder_params),
    )
    judges, judge_variables = judges_lib.load_judges(config)
    return sd, judges, judge_variables


# A model whose images are at least this large is a real Stable Diffusion (SD v1-5: 512 px), days on an
# accelerator; tiny and miniature models (32 px) train on a CPU in seconds per step.
FULL_SIZE_IMAGE_PX = 256


def device_notice(devices: Sequence, image_size: int) -> tuple[str, str | None]:
    """(a line naming the devices the step runs on, a loud warning when a full-size model would train on CPUs
    (None otherwise)). `devices`: the mesh's devices; `image_size`: the generator's image side in pixels."""
    kinds = sorted({f"{d.platform} ({d.device_kind})" for d in devices})
    line = f"training on {len(devices)} device(s): {', '.join(kinds)}"
    if image_size < FULL_SIZE_IMAGE_PX or any(d.platform != "cpu" for d in devices):
        return line, None
    bar = "!" * 100
    warning = (
        f"{bar}\nWARNING: a {image_size}x{image_size} Stable Diffusion model is about to train on the CPU: one step takes\n"
        "hours here instead of seconds on a GPU. If this machine has an NVIDIA GPU, jax's CPU build is installed:\n"
        "rerun `bash scripts/setup_env.sh` (it installs the CUDA build when nvidia-smi sees a GPU; force it with\n"
        f"FAIRDIFF_ACCELERATOR=cuda) and check `python -c 'import jax; print(jax.devices())'`.\n{bar}"
    )
    return line, warning


# ---- logging -------------------------------------------------------------------------------------------


class MetricsWriter:
    """Process 0 writes: JSON lines to workdir/metrics.jsonl ({"step", "kind", **values}) always, and TensorBoard
    events to workdir/tensorboard through clu's metric writers when clu is installed (clu imports TensorFlow,
    so it is imported here only, lazily). Images (uint8 [H, W, 3]) go to TensorBoard; train.py also saves them
    as files."""

    def __init__(self, workdir: Path):
        self.path = workdir / "metrics.jsonl"
        self.active = jax.process_index() == 0
        self.tensorboard = None
        if self.active:
            # clu imports TensorFlow, whose C++ start-up chatter (oneDNN notices) would bury the progress bar.
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            # Keras (imported by TensorFlow) writes its keras.json settings file under KERAS_HOME, else ~/.keras:
            # keep it inside the run's folder rather than the user's home.
            os.environ.setdefault("KERAS_HOME", str(workdir / "tensorboard" / ".keras"))
            try:
                from clu import metric_writers
            except ImportError:
                print("clu is not installed: metrics go to metrics.jsonl only (no TensorBoard)", file=sys.stderr)
            else:
                self.tensorboard = metric_writers.create_default_writer(str(workdir / "tensorboard"), asynchronous=False)

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        if self.tensorboard is not None:
            scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and np.isfinite(v)}
            self._to_tensorboard(lambda writer: writer.write_scalars(step, scalars))

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.active and self.tensorboard is not None:
            self._to_tensorboard(lambda writer: writer.write_images(step, {name: image[None]}))

    def _to_tensorboard(self, write) -> None:
        # A failed event write (disk full) stops the run with its cause in one line, not a TensorFlow trace.
        try:
            write(self.tensorboard)
        except Exception as e:
            self.tensorboard = None  # closing a writer that failed would only fail again and hide this error
            raise health.TrainingError(f"writing TensorBoard events under {self.path.parent / 'tensorboard'} failed: "
                                       f"{checkpoints.cause(e)}") from e

    def close(self) -> None:
        if self.tensorboard is not None:
            self._to_tensorboard(lambda writer: writer.close())


def training_grids(prepared, attributes) -> np.ndarray:
    """The training batch's annotated grids, X (the LoRA's images) above X0 (the frozen model's), uint8."""
    colors = attributes_lib.colors(attributes)
    grids = [
        grids_lib.annotated_grid(images, found_faces.found, found_faces.boxes, probs, colors)
        for images, found_faces, probs in (
            (prepared.images, prepared.detections, prepared.probs),
            (prepared.original_images, prepared.original_detections, prepared.original_probs),
        )
    ]
    return np.concatenate(grids, axis=0)


# ---- the run ---------------------------------------------------------------------------------------------


def next_position(epoch: int, index: int, num_prompts: int) -> dict:
    return {"epoch": epoch, "index": index + 1} if index + 1 < num_prompts else {"epoch": epoch + 1, "index": 0}


# bool [] on device: the LoRA is finite (one compiled reduction instead of one dispatch per leaf).
_all_finite = jax.jit(optim.all_finite)


def _host_bool(x: jax.Array) -> bool:
    return bool(np.asarray(x.addressable_data(0)))


def train(config, workdir: Path, resume: bool, train_prompts: list[str], val_prompts: list[str],
          allow_config_change: bool = False) -> optim.TrainState:
    parallel.initialize_distributed()
    # One run per workdir: a second one would delete this one's temporary checkpoints and interleave its metrics.
    with workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train(config, workdir, resume, allow_config_change, train_prompts, val_prompts)


def _train(config, workdir: Path, resume: bool, allow_config_change: bool, train_prompts: list[str],
           val_prompts: list[str]) -> optim.TrainState:
    c = config.ckpt
    checkpointer = checkpoints.Checkpointer(workdir / "checkpoints", every_steps=c.every_steps, keep=c.keep,
                                            permanent_every_steps=c.permanent_every_steps)
    config_json = config.to_json_best_effort(indent=2)
    if checkpointer.latest_step() is not None:
        if not resume:
            raise InputError(f"{workdir / 'checkpoints'} holds checkpoints {checkpointer.all_steps()}: pass --resume or use a new --workdir")
        if jax.process_index() == 0:
            try:
                workdir_lib.check_resumed_config(workdir, config_json, allow_config_change)
            except workdir_lib.ConfigChangedError as e:
                raise InputError(str(e)) from e

    mesh = parallel.make_mesh()
    try:  # a truncated weight file or a classifier of the wrong shape is the user's to fix: one line, exit 2
        sd, judges, judge_variables = load_models(config)
        detector = judges_lib.make_detector(config)
    except (OSError, ValueError) as e:
        raise InputError(str(e)) from e
    for notice in device_notice(list(mesh.devices.flat), sd.image_size):
        if notice and jax.process_index() == 0:
            print(notice, file=sys.stderr)
    stages = Stages(sd, judges, config, mesh, detector)
    train_step = debias_step.make_train_step(stages)
    frozen = parallel.replicate(debias_step.frozen_weights(sd, judge_variables), mesh)
    evaluation = periodic.PeriodicEvaluation(config, stages, frozen)

    lora = debias_step.init_lora(
        jax.random.key(config.seed), sd, config.lora.rank, config.lora.train_text_encoder, config.lora.train_unet
    )
    o = config.optim
    tx = optim.optimizer_from_config(o)
    learning_rate = optim.learning_rate_schedule(o.learning_rate, o.decay_steps)
    state = parallel.replicate(optim.create_train_state(lora, tx, o.ema_decay, config.seed), mesh)

    position = {"epoch": 0, "index": 0}
    restored = checkpointer.restore_newest_intact(checkpoints.abstract_like(state)) if resume else None
    if restored is not None:
        step, state, position = restored
        print(f"resumed from step {step} at prompt position {position}", file=sys.stderr)
    start = int(np.asarray(state.step.addressable_data(0)))
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config_json)
        workdir_lib.trim_metrics(workdir / "metrics.jsonl", start)  # the steps after `start` are logged again
    writer = MetricsWriter(workdir)

    prompt_stream = prompts.iterate_prompts(train_prompts, config.data.shuffle_seed, position["epoch"], position["index"])
    t = config.train
    guard, healthy = health.BadStepGuard(t.max_bad_steps), True

    def evaluate_if_due(step: int) -> None:
        """The periodic evaluation of the weights after `step` updates: at 0 if eval.at_start, then every
        eval.every_steps, the last step included."""
        if (step == 0 and config.eval.at_start) or (step > 0 and step % config.eval.every_steps == 0):
            weight_sets = {"current": state.params, **({"ema": state.ema_params} if config.eval.ema else {})}
            evaluation.run(step, weight_sets, val_prompts, workdir, writer)

    with checkpointer, contextlib.closing(writer), tqdm(total=t.max_steps, initial=start, desc="train",
                                                        disable=jax.process_index() != 0) as bar:
        for step in range(start, t.max_steps):
            evaluate_if_due(step)
            started = time.perf_counter()
            epoch, index, prompt = next(prompt_stream)
            num_steps = debias_step.denoising_steps_of(config.seed, step, t.min_denoising_steps, t.max_denoising_steps)
            key = debias_step.step_key(state.rng, step)
            applied = int(np.asarray(state.ema_count.addressable_data(0)))  # updates so far (skipped steps are not)
            prepared = debias_step.prepare(stages, state.params, frozen, prompt, num_steps, step, key)
            state, step_metrics = train_step(state, prepared.constants, prepared.batch, key)
            position = next_position(epoch, index, len(train_prompts))

            logged = debias_step.logged_terms(step_metrics["aux"])
            logged.update(bias_lib.bias_metrics(prepared.probs, prepared.detections.found, judges.attributes, config.loss.confidence_level))
            logged.update(ot_targets.target_shares(prepared.targets, prepared.probs, judges.attributes))
            logged.update(
                loss=float(step_metrics["loss"]), skipped=int(step_metrics["skipped"]), grad_norm=float(step_metrics["grad_norm"]),
                learning_rate=float(learning_rate(applied)),
                faces=int(prepared.detections.found.sum()), denoising_steps=num_steps, seconds=time.perf_counter() - started,
            )
            if (step + 1) % t.log_every_steps == 0:
                writer.write(step + 1, "train", {"prompt": prompt, **logged})
            gaps = {k: f"{v:.2f}" for k, v in logged.items() if k.endswith("_bias") and np.isfinite(v)}
            if (step + 1) % t.plot_every_steps == 0 and jax.process_index() == 0:
                grid = training_grids(prepared, judges.attributes)
                grids_lib.save_image(grid, workdir / "train_grids" / f"step_{step + 1}.jpg")
                writer.write_image(step + 1, "train/grid", grid)
            bar.set_postfix(loss=f"{logged['loss']:.3f}", **gaps)
            bar.update(1)
            healthy = guard.update(step + 1, logged["loss"], bool(logged["skipped"]), _host_bool(_all_finite(state.params)))
            if healthy:  # a NaN state is never checkpointed: the newest checkpoint stays one to resume from
                checkpointer.save(state, position)
        if healthy:
            checkpointer.save(state, position, force=True)
            if start < t.max_steps:  # a resumed run that had nothing left to train was evaluated before
                evaluate_if_due(t.max_steps)
        else:
            print(f"warning: the last step's state is not finite: no checkpoint of step {t.max_steps} "
                  f"(the newest is {checkpointer.latest_step()})", file=sys.stderr)
    return state


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        config, workdir, resume, allow_config_change = parse_args(argv)
        train_prompts, val_prompts = check_inputs(config)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(config, workdir, resume, train_prompts, val_prompts, allow_config_change)
    except (InputError, workdir_lib.WorkdirBusyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (health.TrainingError, checkpoints.CheckpointError, OSError) as e:  # OSError: e.g. a full disk
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
