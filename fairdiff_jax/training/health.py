"""Stops a run whose training has gone non-finite, instead of letting it train on (and export) NaN weights.

    guard = BadStepGuard(config.train.max_bad_steps)
    healthy = guard.update(step, loss, skipped, optim.all_finite(state.params))   # TrainingError after N bad in a row

A step is bad when its loss is not finite, its update was skipped (non-finite gradients, optim.apply_gradients)
or the LoRA it leaves is not finite (e.g. a NaN learning rate turns finite gradients into NaN weights). One bad
step can be noise (a batch whose judges found nothing usable); `max_bad_steps` in a row means the run is broken.
Checkpoints are written only for healthy steps, so the newest checkpoint is never a NaN state.
"""

import math


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite training, a failed checkpoint save); the message says why."""


class BadStepGuard:
    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row = 0

    def update(self, step: int, loss: float, skipped: bool, params_finite: bool) -> bool:
        """Records training step `step` (1-based); returns whether its state is healthy (finite weights, update
        applied, finite loss). Raises TrainingError after `max_bad_steps` bad steps in a row."""
        reasons = [text for bad, text in ((not math.isfinite(loss), f"loss {loss}"),
                                          (skipped, "update skipped for non-finite gradients"),
                                          (not params_finite, "LoRA weights not finite")) if bad]
        self.bad_in_a_row = self.bad_in_a_row + 1 if reasons else 0
        if self.bad_in_a_row >= self.max_bad_steps:
            raise TrainingError(
                f"training stopped at step {step}: {self.bad_in_a_row} bad steps in a row (last: {', '.join(reasons)}; "
                f"config.train.max_bad_steps = {self.max_bad_steps}); check the learning rate and the model files, "
                "and resume from the newest checkpoint (only healthy steps are checkpointed)")
        return not reasons
