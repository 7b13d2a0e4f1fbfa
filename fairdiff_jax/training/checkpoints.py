"""Orbax checkpoints of the training state and the data position; resuming reproduces the run.

One checkpoint = a step directory holding `state` (the `TrainState` leaves: step, LoRA, AdamW state,
EMA and its update count, the raw RNG key data) and `data` (JSON: where the prompt stream stands, e.g.
{"epoch": 3, "index_in_epoch": 17, "shuffle_seed": 5992}; any JSON-able dict).

Retention as in the paper's code (docs/method.md#hyper-parameters-experiment-5): a temporary checkpoint every `every_steps` steps of which the
newest `keep` survive, and a permanent one at every multiple of `permanent_every_steps`, never deleted.
Orbax expresses this directly: save at multiples of `every_steps` (plus when a TPU preemption notice
arrives) and preserve a checkpoint if it is among the newest `keep` OR its step is a multiple of
`permanent_every_steps`. E.g. every 2, keep 2, permanent 6, steps 1..13 leave {6, 10, 12}; the original's
two folders would hold temporaries {10, 12} and permanents {6, 12}: the same states.

Orbax writes each step into a temporary directory and renames it when complete, so a crash never leaves
a half-written checkpoint that `restore_latest` would pick. Saves are asynchronous (device-to-host
copy happens before `save` returns, the file writing in the background): use `Checkpointer` as a context
manager, or call `close()`, so the last save is finished before the process exits. With several
processes every process calls `save`/`restore` and the directory must be shared (e.g. gs://, which
needs `gcsfs`).

Failures say what went wrong in one line: a background save that failed (disk full) raises CheckpointError with
its cause at the next `save` or at `close`, so the run stops instead of training on without checkpoints; a
newest checkpoint that cannot be read (damaged files, a deleted manifest) is skipped by `restore_newest_intact`,
which restores the newest one that reads, warns naming what was wrong, and moves the damaged ones aside
(<directory>_damaged/<step>) so that the resumed run can save those steps again.
"""

import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from fairdiff_jax.training.optim import TrainState


def abstract_like(tree: Any, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
    """ShapeDtypeStructs with shardings, the restore target: from a real state (its shardings) or from
    `jax.eval_shape(...)` output plus `sharding` (e.g. `parallel.replicated(mesh)`)."""

    def abstract(x):
        target = getattr(x, "sharding", None) or sharding
        if target is None:
            raise ValueError("restore target has no sharding: pass `sharding=` (e.g. parallel.replicated(mesh))")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target)

    return jax.tree.map(abstract, tree)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or no checkpoint could be restored; the message gives the cause."""


def cause(error: BaseException) -> str:
    """'Type: first line of the message' of an exception (orbax's messages run over many lines)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _step_of(state: TrainState) -> int:
    # addressable_data works for replicated arrays on every process, unlike device_get of a global array.
    step = state.step
    return int(np.asarray(step.addressable_data(0) if isinstance(step, jax.Array) else step))


class Checkpointer:
    """Saves and restores (TrainState, data position) under `directory`, with the retention above."""

    def __init__(
        self,
        directory: str | Path,
        *,
        every_steps: int = 20,
        keep: int = 2,
        permanent_every_steps: Optional[int] = 200,
        async_save: bool = True,
    ):
        save_policies = [
            checkpoint_managers.FixedIntervalPolicy(every_steps),
            checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]
        preserve_policies = [checkpoint_managers.LatestN(keep)]
        if permanent_every_steps:
            preserve_policies.append(checkpoint_managers.EveryNSteps(permanent_every_steps))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=checkpoint_managers.AnySavePolicy(save_policies),
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(preserve_policies),
            enable_async_checkpointing=async_save,
        )
        self.directory = directory
        self._manager = ocp.CheckpointManager(directory, options=options)

    def should_save(self, step: int) -> bool:
        """Whether `save` would write a checkpoint at `step` (without `force`)."""
        return self._manager.should_save(step)

    def save(self, state: TrainState, data_position: Mapping[str, Any], *, force: bool = False) -> bool:
        """Checkpoints `state` at step `state.step` if the policy says so (or `force`, e.g. the last step).

        Returns whether a save was started (False also when this step is already saved, so a final
        forced save may coincide with a regular one). Call on every process, after every training step.
        """
        step = _step_of(state)
        try:
            self._manager.check_for_errors()  # an earlier background save that failed stops the run here
            if step in self._manager.all_steps():
                return False
            return self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_position))),
                force=force,
            )
        except Exception as e:  # orbax reports write failures as ValueError/OSError/XlaRuntimeError, by backend
            raise CheckpointError(f"saving a checkpoint under {self.directory} failed: {cause(e)}") from e

    def all_steps(self) -> list[int]:
        """Steps with a finished checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """(state, data position) saved at `step`; `abstract_state` gives tree, shapes, dtypes, shardings
        (`abstract_like`) and the static fields (optimizer, EMA decay) of the returned state."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["data"])

    def restore_newest_intact(self, abstract_state: TrainState) -> Optional[tuple[int, TrainState, dict[str, Any]]]:
        """(step, state, data position) of the newest checkpoint that restores, or None when there is none.

        Each newer one that fails is named in a one-line warning and, once an older one has restored, moved to
        <directory>_damaged/<step>. When none restores, CheckpointError lists every step's cause and nothing is
        moved (a wrong `abstract_state` fails them all, and must not cost the run its checkpoints).
        """
        damaged = []
        for step in reversed(self.all_steps()):
            try:
                state, position = self.restore(step, abstract_state)
            except Exception as e:  # orbax raises whatever its storage layer met: ValueError, OSError, JSONDecodeError, ...
                damaged.append((step, cause(e)))
                print(f"warning: checkpoint {step} in {self.directory} cannot be read ({cause(e)}); trying an older one",
                      file=sys.stderr)
                continue
            self._set_aside([step for step, _ in damaged])
            return step, state, position
        if damaged:
            listed = "; ".join(f"step {step}: {why}" for step, why in damaged)
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored ({listed})")
        return None

    def _set_aside(self, steps: Sequence[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            aside = Path(self.directory).with_name(Path(self.directory).name + "_damaged")
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / str(step)
                shutil.rmtree(target, ignore_errors=True)
                shutil.move(str(Path(self.directory) / str(step)), target)
                print(f"warning: moved damaged checkpoint {step} to {target}", file=sys.stderr)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoints set aside")
        self._manager.reload()

    def restore_latest(self, abstract_state: TrainState) -> Optional[tuple[TrainState, dict[str, Any]]]:
        """The newest checkpoint as (state, data position), or None when there is none."""
        step = self.latest_step()
        return None if step is None else self.restore(step, abstract_state)

    def wait(self) -> None:
        """Blocks until the pending asynchronous save (if any) is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager; CheckpointError if a pending save failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._close_quietly()
            raise CheckpointError(f"saving a checkpoint under {self.directory} failed: {cause(e)}") from e
        self._manager.close()

    def _close_quietly(self) -> None:
        # Joins orbax's background threads even after a failed save: left running, they die at interpreter
        # shutdown with tracebacks that bury the real cause.
        try:
            self._manager.close()
        except Exception:
            pass

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:  # the exception on its way out says what happened; a second one from closing would hide it
            self._close_quietly()


def restore_latest(directory: str | Path, abstract_state: TrainState) -> Optional[tuple[TrainState, dict[str, Any]]]:
    """The newest checkpoint under `directory` as (state, data position), or None (e.g. for export tools)."""
    if "://" not in str(directory) and not Path(directory).is_dir():
        return None
    with Checkpointer(directory, async_save=False) as checkpointer:
        return checkpointer.restore_latest(abstract_state)
