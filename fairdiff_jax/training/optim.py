"""The trainable state, AdamW, the EMA of the LoRA parameters, and the update that skips non-finite steps.

What the paper's code does (docs/method.md#hyper-parameters-experiment-5; its training loop with torch AdamW and diffusers 0.19.3 `EMAModel`):

  - AdamW, lr 5e-5 constant, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2 on every LoRA factor,
    no gradient clipping. `optax.adamw` is the same update: torch multiplies p by (1 - lr * wd) and then
    subtracts lr * m_hat / (sqrt(v_hat) + eps); optax subtracts lr * (m_hat / (sqrt(v_hat) + eps) + wd * p),
    equal in exact arithmetic, with the same bias correction (t = number of Adam updates so far + 1).
  - EMA: `EMAModel(lora_params, decay=0.996)`, i.e. update_after_step=0, use_ema_warmup=False,
    min_decay=0. Its `step()` first increments `optimization_step`, then calls
    `get_decay(optimization_step)`, which computes `s = max(0, optimization_step - 1)` and returns 0 if
    s <= 0, else min(decay, (1 + s) / (10 + s)). So at the k-th EMA update (k = 1, 2, ...):

        decay_1 = 0,   decay_k = min(0.996, k / (9 + k)) for k >= 2,
        shadow <- shadow - (1 - decay_k) * (shadow - params)        (params after the optimizer step)

    The shadow starts as a copy of the initial LoRA; the first update makes it a copy of the updated
    params. k / (9 + k) reaches 0.996 at k = 2241.
  - A step whose gradient has any non-finite value calls neither `optimizer.step()` nor `ema.step()`:
    parameters, Adam moments and Adam's step count, the EMA and its update count k all stay as they were.
    The loop's `global_step` still advances (it counts prompts consumed: data position, checkpoint and
    evaluation cadence all follow it), and so does `TrainState.step` here.

    Finiteness is tested on the final, global gradient, the same on every device
    (docs/method.md#differences-from-the-papers-code).
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


def make_optimizer(
    learning_rate: float = 5e-5,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    decay_steps: int = 0,
) -> optax.GradientTransformation:
    """AdamW, decaying every leaf (as torch AdamW did on the LoRA factors). The learning rate is constant (the
    original's) with decay_steps = 0; else it falls along a half cosine from `learning_rate` at the first applied
    update to 0 after `decay_steps` of them (and stays 0): lr_k = learning_rate * (1 + cos(pi k / decay_steps)) / 2.
    Skipped steps do not advance it (Adam's count does not move)."""
    # A constant rate stays a float: its AdamW state has no schedule count, as checkpoints of such runs hold.
    rate = learning_rate_schedule(learning_rate, decay_steps) if decay_steps else learning_rate
    return optax.adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def learning_rate_schedule(learning_rate: float, decay_steps: int = 0) -> optax.Schedule:
    """The learning rate of the update after `k` applied ones (`make_optimizer`'s rule), k an int."""
    if decay_steps:
        return optax.cosine_decay_schedule(learning_rate, decay_steps)
    return optax.constant_schedule(learning_rate)


def optimizer_from_config(optim_config) -> optax.GradientTransformation:
    """`make_optimizer` of a config's `optim` section (configs/common.py)."""
    o = optim_config
    return make_optimizer(o.learning_rate, o.b1, o.b2, o.eps, o.weight_decay, o.decay_steps)


def ema_decay_at(update_index: jax.Array, max_decay: float) -> jax.Array:
    """Decay of the k-th EMA update (k = `update_index` >= 1): 0 for k = 1, else min(max_decay, k / (9 + k))."""
    k = jnp.asarray(update_index, jnp.float32)
    return jnp.where(k <= 1, 0.0, jnp.minimum(max_decay, k / (9.0 + k)))


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position (which checkpoints.py stores beside it).

    step:       int32 [], training steps taken, skipped ones included.
    params:     the LoRA pytree (float32), the only thing optimised.
    opt_state:  AdamW state (its count advances only on applied steps).
    ema_params: EMA shadow of `params` (same tree).
    ema_count:  int32 [], EMA updates applied so far (k of the last update; 0 before the first).
    rng:        uint32 [2], raw key data of the run's base key; per-step keys are derived from it, e.g.
                `jax.random.fold_in(state.rng, state.step)`, so a resumed run draws the same numbers.
    tx, ema_decay: static (not saved): the optimizer and the EMA's maximum decay.
    """

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    ema_params: Any
    ema_count: jax.Array
    rng: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    ema_decay: float = flax.struct.field(pytree_node=False)


def create_train_state(params: Any, tx: optax.GradientTransformation, ema_decay: float, seed: int) -> TrainState:
    """Step 0: fresh optimizer state, EMA shadow = a copy of `params`, base key from `seed`."""
    params = jax.tree.map(jnp.asarray, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        # A real copy: donating a state whose two fields share one buffer would fail.
        ema_params=jax.tree.map(jnp.copy, params),
        ema_count=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        tx=tx,
        ema_decay=ema_decay,
    )


def all_finite(tree: Any) -> jax.Array:
    """bool []: True when every element of every leaf is finite."""
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)], dtype=bool))


def apply_gradients(state: TrainState, grads: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step then one EMA update, or neither when `grads` holds a non-finite value.

    `grads` is the final gradient (already averaged over examples and devices). Jit-friendly: both
    outcomes are computed and selected leaf by leaf, no Python branch on traced values.

    Returns (state with step + 1, metrics): `skipped` int32 (1 = nothing applied), `grad_norm` (global L2
    norm of `grads`), `ema_decay` (the decay this step's EMA update used; meaningless when skipped).
    """
    finite = all_finite(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_count = state.ema_count + 1
    decay = ema_decay_at(ema_count, state.ema_decay)
    # diffusers' form, shadow - (1 - d) * (shadow - p): with d = 0 the shadow becomes p exactly.
    ema_params = jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p), state.ema_params, params)

    def keep_if_skipped(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_skipped(params, state.params),
        opt_state=keep_if_skipped(opt_state, state.opt_state),
        ema_params=keep_if_skipped(ema_params, state.ema_params),
        ema_count=jnp.where(finite, ema_count, state.ema_count),
    )
    metrics = {
        "skipped": jnp.logical_not(finite).astype(jnp.int32),
        "grad_norm": optax.global_norm(grads),
        "ema_decay": decay,
    }
    return new_state, metrics
