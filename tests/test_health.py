"""A run whose training goes non-finite stops with a message instead of training on NaN weights."""

import math

import jax.numpy as jnp
import pytest

from fairdiff_jax.training import health, optim


def test_stops_after_max_bad_steps_in_a_row():
    guard = health.BadStepGuard(3)
    assert guard.update(1, 0.5, False, True)
    assert not guard.update(2, math.nan, False, True)
    assert not guard.update(3, 0.4, True, True)
    with pytest.raises(health.TrainingError, match=r"step 4: 3 bad steps in a row .*LoRA weights not finite"):
        guard.update(4, 0.4, False, False)


def test_a_healthy_step_resets_the_count():
    guard = health.BadStepGuard(2)
    for step in range(1, 10):  # bad, good, bad, good, ...: never two in a row
        assert guard.update(step, math.inf if step % 2 else 0.1, False, True) == (step % 2 == 0)


def test_nan_weights_are_seen_by_all_finite():
    # The loop's weight check: a LoRA with one NaN leaf is not finite.
    lora = {"a": {"down": jnp.ones((3, 2)), "up": jnp.zeros((2, 3))}}
    assert bool(optim.all_finite(lora))
    lora["a"]["up"] = lora["a"]["up"].at[1, 2].set(jnp.nan)
    assert not bool(optim.all_finite(lora))
