"""AdamW + EMA + non-finite skip against the original's PyTorch loop (torch AdamW, diffusers EMAModel).

diffusers 0.42's EMAModel.get_decay/step (installed here) are line for line the 0.19.3 ones the original
used (read off the 0.19.3 wheel): step() increments optimization_step, then
get_decay(s) = 0 if s - 1 <= 0 else min(decay, s / (9 + s)), shadow -= (1 - decay) * (shadow - param).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel

from fairdiff_jax.training import optim


def _params(seed=0):
    rs = np.random.RandomState(seed)
    return {"te": {"q_proj": {"down": rs.randn(6, 3).astype(np.float32), "up": rs.randn(3, 5).astype(np.float32)}},
            "bias_like": rs.randn(4).astype(np.float32)}


def _grads(step, params):
    rs = np.random.RandomState(100 + step)
    return jax.tree.map(lambda p: rs.randn(*p.shape).astype(np.float32), params)


def test_ema_decay_schedule_by_hand():
    # k = 1: copy; k >= 2: k / (9 + k) until it reaches the cap at k = 2241 (2241 / 2250 = 0.996).
    k = np.array([1, 2, 3, 10, 2240, 2241, 5000])
    expected = [0.0, 2 / 11, 3 / 12, 10 / 19, 2240 / 2249, 0.996, 0.996]
    np.testing.assert_allclose(optim.ema_decay_at(k, 0.996), expected, rtol=1e-6)


def test_ema_first_updates_by_hand():
    # Scalar LoRA, SGD-free check of the EMA arithmetic: a zero gradient with zero weight decay keeps
    # the params fixed at p, so the shadow follows s_k = s_{k-1} - (1 - d_k)(s_{k-1} - p).
    tx = optim.make_optimizer(learning_rate=0.0, weight_decay=0.0)
    state = optim.create_train_state({"w": np.array([2.0], np.float32)}, tx, 0.996, seed=0)
    state = state.replace(ema_params={"w": jnp.array([10.0])})  # a shadow that differs from the params
    shadows = []
    for _ in range(3):
        state, metrics = optim.apply_gradients(state, {"w": jnp.zeros(1)})
        shadows.append(float(state.ema_params["w"][0]))
    # k=1: d=0 -> 2; then the shadow equals p = 2 and stays there.
    assert shadows == [2.0, 2.0, 2.0]
    state = state.replace(ema_params={"w": jnp.array([10.0])})
    state, metrics = optim.apply_gradients(state, {"w": jnp.zeros(1)})
    # k=4: d = 4/13: s = 10 - (9/13)(10 - 2) = 10 - 72/13
    np.testing.assert_allclose(state.ema_params["w"][0], 10 - 72 / 13, rtol=1e-6)
    np.testing.assert_allclose(metrics["ema_decay"], 4 / 13, rtol=1e-6)
    assert int(state.ema_count) == 4


@pytest.mark.parametrize("learning_rate, decay_steps", [(5e-5, 0), (1e-3, 7)])
def test_matches_torch_adamw_and_diffusers_ema_with_a_skipped_step(learning_rate, decay_steps):
    """The original's loop: grads -> (finite?) AdamW step -> EMA step; a non-finite step does neither. With
    decay_steps, the cosine decay is torch's CosineAnnealingLR(T_max=decay_steps), stepped after each applied
    update (a skipped step moves neither schedule)."""
    params = _params()
    leaves, treedef = jax.tree.flatten(params)
    torch_params = [torch.nn.Parameter(torch.tensor(x)) for x in leaves]
    torch_opt = torch.optim.AdamW(torch_params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    torch_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(torch_opt, T_max=decay_steps) if decay_steps else None
    torch_ema = EMAModel(torch_params, decay=0.996)

    tx = optim.make_optimizer(learning_rate, decay_steps=decay_steps)
    state = jax.jit(lambda p: optim.create_train_state(p, tx, 0.996, seed=5991))(params)
    step_fn = jax.jit(optim.apply_gradients)
    nan_step = 3
    for step in range(8):
        grads = _grads(step, params)
        if step == nan_step:
            grads["bias_like"][1] = np.nan
        state, metrics = step_fn(state, grads)
        assert int(metrics["skipped"]) == (step == nan_step)
        if step != nan_step:
            for p, g in zip(torch_params, jax.tree.leaves(grads)):
                p.grad = torch.tensor(g)
            torch_opt.step()
            if torch_schedule is not None:
                torch_schedule.step()
            torch_ema.step(torch_params)
    assert int(state.step) == 8 and int(state.ema_count) == 7 == torch_ema.optimization_step
    assert int(state.opt_state[0].count) == 7
    for ours, theirs in zip(jax.tree.leaves(state.params), torch_params):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-6, atol=1e-7)  # ~2 ulp
    for ours, theirs in zip(jax.tree.leaves(state.ema_params), torch_ema.shadow_params):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-7)
    # The run actually moved the weights (so the comparison above is not trivially about constants).
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(state.params), leaves)) > 1e-4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_skips_optimizer_and_ema(bad):
    params = _params()
    state = optim.create_train_state(params, optim.make_optimizer(), 0.996, seed=1)
    step_fn = jax.jit(optim.apply_gradients)
    state, _ = step_fn(state, _grads(0, params))  # one real step, so moments and EMA are non-trivial
    grads = _grads(1, params)
    grads["te"]["q_proj"]["up"][2, 4] = bad
    new_state, metrics = step_fn(state, grads)
    assert int(metrics["skipped"]) == 1
    assert int(new_state.step) == int(state.step) + 1  # the training step counts prompts consumed
    assert int(new_state.ema_count) == int(state.ema_count) == 1
    for field in ("params", "opt_state", "ema_params"):
        for new, old in zip(jax.tree.leaves(getattr(new_state, field)), jax.tree.leaves(getattr(state, field))):
            np.testing.assert_array_equal(new, old)
    np.testing.assert_array_equal(new_state.rng, state.rng)
    # A finite step afterwards updates again and counts EMA update k = 2.
    after, metrics = step_fn(new_state, _grads(2, params))
    assert int(metrics["skipped"]) == 0 and int(after.ema_count) == 2
    np.testing.assert_allclose(metrics["ema_decay"], 2 / 11, rtol=1e-6)
    assert not np.array_equal(after.params["bias_like"], new_state.params["bias_like"])


def test_create_train_state_fields():
    params = _params()
    state = optim.create_train_state(params, optim.make_optimizer(), 0.996, seed=5991)
    np.testing.assert_array_equal(state.rng, jax.random.key_data(jax.random.key(5991)))
    assert state.rng.dtype == jnp.uint32 and int(state.step) == 0 and int(state.ema_count) == 0
    for p, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
        np.testing.assert_array_equal(p, e)
        assert p.unsafe_buffer_pointer() != e.unsafe_buffer_pointer()  # distinct buffers (donation-safe)
