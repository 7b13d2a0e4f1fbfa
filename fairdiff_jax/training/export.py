"""A training checkpoint -> LoRA files in the original's layout and in diffusers' PEFT safetensors.

    python -m fairdiff_jax.export --workdir workdirs/debias_text_encoder [--step 12600] [--out DIR]

writes DIR (default: <workdir>/checkpoint-<step>_exported/) with, for each trained part (text encoder
and/or UNet):
    text_encoder_lora.pth, text_encoder_lora_EMA.pth, unet_lora.pth, unet_lora_EMA.pth   (lora.save_original)
    pytorch_lora_weights.safetensors, EMA/pytorch_lora_weights.safetensors               (lora.save_diffusers)
The .pth files load in the original's gen-images script and in `python -m fairdiff_jax.generate
--text_encoder_lora/--unet_lora`; the safetensors in diffusers' `pipe.load_lora_weights(DIR)` (and DIR/EMA).
Needs no model files: the LoRA trees come from the checkpoint alone, on the CPU of any machine.

The folder is written whole or not at all: the files go to a temporary folder beside DIR that replaces DIR when
complete (an existing DIR is replaced, never mixed with the new files). A checkpoint that cannot be read, or whose
LoRA is not finite, is an error naming it (exit 2); the same weights give byte-identical files.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from fairdiff_jax.sd import lora as lora_lib
from fairdiff_jax.training import checkpoints

PARTS = ("text_encoder", "unet")


class ExportError(ValueError):
    """A missing workdir, checkpoint or step; the message names it and lists the steps that exist."""


def available_steps(checkpoint_dir: Path) -> list[int]:
    """Steps with a finished checkpoint: orbax step folders (named by the step) holding a state item; orbax
    writes unfinished ones under a temporary name, so they never match."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def read_state(workdir: str | Path, step: int) -> dict:
    """The whole saved TrainState of checkpoint `step` under workdir/checkpoints as a numpy tree
    {'step', 'params', 'opt_state', 'ema_params', 'ema_count', 'rng'}, restored onto one CPU device whatever
    mesh saved it (the LoRA trees are {'text_encoder'?: ..., 'unet'?: ...})."""
    checkpoint_dir = Path(workdir) / "checkpoints"
    steps = available_steps(checkpoint_dir)
    if step not in steps:
        listed = ", ".join(map(str, steps)) if steps else "none"
        raise ExportError(f"no checkpoint for step {step} in {checkpoint_dir} (available steps: {listed})")
    state_dir = (checkpoint_dir / str(step) / "state").absolute()
    checkpointer = ocp.StandardCheckpointer()
    try:
        metadata = checkpointer.metadata(state_dir)
        if metadata is None or metadata.item_metadata is None:
            raise ValueError(f"no metadata in {state_dir}")
        device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata.item_metadata.tree)
        return jax.tree.map(np.asarray, checkpointer.restore(state_dir, target))
    except Exception as e:  # orbax raises whatever its storage layer met (ValueError, OSError, XlaRuntimeError, ...)
        others = ", ".join(str(s) for s in steps if s != step) or "none"
        raise ExportError(f"checkpoint {step} in {checkpoint_dir} cannot be read ({checkpoints.cause(e)}); "
                          f"other steps: {others}") from e
    finally:
        checkpointer.close()


def check_finite(lora_trees: dict, what: str) -> None:
    """ExportError when any LoRA value is not finite (a run that diverged; its files would draw black images)."""
    leaves = jax.tree.leaves(lora_trees)
    bad = sum(int(np.size(x) - np.isfinite(x).sum()) for x in leaves)
    if bad:
        raise ExportError(f"{what}: {bad} of {sum(np.size(x) for x in leaves)} LoRA values are not finite")


def _replace_folder(tmp: Path, out: Path) -> None:
    """Puts the finished folder `tmp` at `out`; an existing `out` is moved away first and deleted after."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def export(workdir: str | Path, step: int, out: str | Path | None = None) -> Path:
    """Writes the files of the module docstring; returns the output folder."""
    out = Path(out) if out is not None else Path(workdir) / f"checkpoint-{step}_exported"
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    state = read_state(workdir, step)
    params, ema_params = state["params"], state["ema_params"]
    check_finite({"params": params, "ema_params": ema_params}, f"checkpoint {step} in {Path(workdir) / 'checkpoints'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for part in PARTS:
            if part in params:
                lora_lib.save_original(params[part], tmp / f"{part}_lora.pth", part)
                lora_lib.save_original(ema_params[part], tmp / f"{part}_lora_EMA.pth", part)
        lora_lib.save_diffusers(tmp, **{part: params[part] for part in PARTS if part in params})
        lora_lib.save_diffusers(tmp / "EMA", **{part: ema_params[part] for part in PARTS if part in ema_params})
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairdiff_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="the training run's folder")
    parser.add_argument("--step", type=int, help="checkpoint step to export (default: the newest)")
    parser.add_argument("--out", type=Path, help="output folder (default: <workdir>/checkpoint-<step>_exported)")
    args = parser.parse_args(argv)
    try:
        step = args.step
        if step is None:
            steps = available_steps(args.workdir / "checkpoints")
            if not steps:
                raise ExportError(f"no finished checkpoint in {args.workdir / 'checkpoints'}")
            step = steps[-1]
        out = export(args.workdir, step, args.out)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
