"""DPM-Solver++(2M) with classifier-free guidance, as pure functions over `lax.scan`.

The sampler reproduces diffusers 0.19.3's `DPMSolverMultistepScheduler` built from SD v1-5's
scheduler config (docs/method.md#sampler): epsilon prediction, solver_order 2, algorithm dpmsolver++, midpoint
second-order update, lower_order_final (first-order last step below 15 steps), linspace timestep
spacing, and the last step landing on training timestep 0 (current diffusers:
`final_sigmas_type="sigma_min"`).

With VP quantities alpha_i = sqrt(abar(t_i)), sigma_i = sqrt(1 - abar(t_i)), lambda_i =
log(alpha_i / sigma_i), one step from t_i to t_{i+1} (t_n = training timestep 0) is

    x0_i     = (x_i - sigma_i * eps_i) / alpha_i
    h        = lambda_{i+1} - lambda_i,   w = alpha_{i+1} * (1 - exp(-h))
    1st order: x_{i+1} = (sigma_{i+1} / sigma_i) x_i + w x0_i
    2nd order: x_{i+1} = (sigma_{i+1} / sigma_i) x_i + w (1 + 1/(2 r)) x0_i - w/(2 r) x0_{i-1},
               r = (lambda_i - lambda_{i-1}) / h

i.e. every step is LINEAR in (x_i, eps_i, x0_{i-1}) with per-step coefficients, which the
`Schedule` precomputes (in float64, stored as float32).
"""

import dataclasses
import functools
import json
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Keys of a scheduler_config.json whose value changes DPMSolverMultistepScheduler's samples, and the
# value this sampler implements. Keys of other schedulers' configs (PNDM's skip_prk_steps, DDIM's
# clip_sample...) do not reach DPMSolverMultistepScheduler and are ignored; so are steps_offset (no
# effect with linspace spacing) and final_sigmas_type (the original's diffusers 0.19.3 always ended
# on timestep 0, whatever later versions default to).
_FIXED_SCHEDULER_KEYS = {
    "prediction_type": "epsilon",
    "trained_betas": None,
    "timestep_spacing": "linspace",
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "thresholding": False,
    "variance_type": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "rescale_betas_zero_snr": False,
    "lambda_min_clipped": float("-inf"),
}
_BETA_SCHEDULES = ("scaled_linear", "linear")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule (defaults: SD v1-5)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    @classmethod
    def from_json(cls, path: str | Path) -> "SchedulerConfig":
        """Reads a diffusers scheduler_config.json; raises ValueError naming the file and the key it cannot honour."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"scheduler config not found: {path}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read scheduler config {path}: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        for key, supported in _FIXED_SCHEDULER_KEYS.items():
            if key in raw and raw[key] != supported:
                raise ValueError(f"{path}: {key} = {raw[key]!r} is not supported (this sampler implements {supported!r})")
        if raw.get("beta_schedule", cls.beta_schedule) not in _BETA_SCHEDULES:
            raise ValueError(f"{path}: beta_schedule = {raw['beta_schedule']!r} is not supported (supported: {_BETA_SCHEDULES})")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})


def training_betas(config: SchedulerConfig) -> np.ndarray:
    """beta(t) for t = 0 .. num_train_timesteps - 1, float64 [T]."""
    t = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, t, dtype=np.float64) ** 2
    return np.linspace(config.beta_start, config.beta_end, t, dtype=np.float64)


def training_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """abar(t) = prod_{s <= t} (1 - beta(s)) for t = 0 .. num_train_timesteps - 1, float64 [T]."""
    return np.cumprod(1.0 - training_betas(config))


def inference_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """The training timesteps the sampler visits, descending: round(linspace(0, T-1, n+1))[::-1][:-1], int [n]."""
    if num_steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {num_steps}")
    grid = np.linspace(0, config.num_train_timesteps - 1, num_steps + 1).round()
    return grid[::-1][:-1].astype(np.int64)


class Schedule(NamedTuple):
    """Per-step quantities of an n-step DPM-Solver++(2M) run; every field is an array [n].

    Step i maps the latent at `timesteps[i]` to the one at the next timestep (training timestep 0
    after the last step).
    """

    timesteps: jax.Array  # int32: the UNet's timestep input at step i
    alpha: jax.Array  # sqrt(abar(t_i))
    sigma: jax.Array  # sqrt(1 - abar(t_i))
    latent_coef: jax.Array  # sigma_{i+1} / sigma_i
    x0_coef: jax.Array  # weight of this step's x0 prediction
    prev_x0_coef: jax.Array  # weight of the previous step's x0 prediction (0 on first-order steps)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def make_schedule(config: SchedulerConfig, num_steps: int) -> Schedule:
    """The `Schedule` of an n-step run (host-side numpy in float64, returned as float32 jax arrays)."""
    timesteps = inference_timesteps(config, num_steps)
    abar_all = training_alphas_cumprod(config)
    abar = abar_all[np.concatenate([timesteps, [0]])]  # [n + 1]: the last target is timestep 0
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha) - np.log(sigma)
    h = lam[1:] - lam[:-1]  # [n]
    w = alpha[1:] * -np.expm1(-h)
    # Second order except on the first step, and on the last one when there are fewer than 15 steps.
    second_order = np.arange(num_steps) > 0
    if num_steps < 15:
        second_order[-1] = False
    r = np.ones(num_steps)  # r[0] is never used (step 0 is first order)
    r[1:] = (lam[1:-1] - lam[:-2]) / h[1:]
    half_over_r = np.where(second_order, 0.5 / r, 0.0)
    as32 = lambda a: jnp.asarray(a, jnp.float32)
    return Schedule(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        alpha=as32(alpha[:-1]),
        sigma=as32(sigma[:-1]),
        latent_coef=as32(sigma[1:] / sigma[:-1]),
        x0_coef=as32(w * (1.0 + half_over_r)),
        prev_x0_coef=as32(-w * half_over_r),
    )


def solver_step(
    schedule: Schedule, step: jax.Array | int, latents: jax.Array, eps: jax.Array, prev_x0: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One DPM-Solver++(2M) step: (x_i, eps_i, x0_{i-1}) -> (x_{i+1}, x0_i); linear in all three.

    Args:
      schedule: from `make_schedule`.
      step: index i (a Python int or a traced scalar, e.g. the `lax.scan` counter).
      latents: x_i [B, h, w, C] float32.
      eps: the (guided) noise prediction at step i, like `latents`.
      prev_x0: the x0 prediction of step i-1, like `latents` (its coefficient is 0 at step 0; pass zeros).

    Returns:
      (x_{i+1}, x0_i), both like `latents`.
    """
    c = jax.tree.map(lambda a: a[step], schedule)
    x0 = (latents - c.sigma * eps) / c.alpha
    return c.latent_coef * latents + c.x0_coef * x0 + c.prev_x0_coef * prev_x0, x0


# (latents [2B, h, w, C], timesteps [2B] int32, context [2B, T, D], context_mask [2B, T] or None) -> eps [2B, h, w, C]
EpsFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]


def guided_eps(
    eps_fn: EpsFn,
    latents: jax.Array,
    timestep: jax.Array,
    cond: jax.Array,
    uncond: jax.Array,
    guidance_scale: float | jax.Array,
    context_mask: jax.Array | None = None,
) -> jax.Array:
    """Classifier-free guidance: eps_u + g (eps_c - eps_u), both from ONE batched model call.

    Args:
      eps_fn: (latents [2B, h, w, C], timesteps [2B] int32, context [2B, T, D], context_mask [2B, T] or
        None) -> eps [2B, h, w, C], e.g. `lambda x, t, c, m: unet.apply({'params': p}, x, t, c, m)`.
      latents: [B, h, w, C] float32.
      timestep: scalar int.
      cond, uncond: prompt and negative-prompt embeddings, [B, T, D] or [1, T, D] (shared by the batch).
      context_mask: [B or 1, T] bool or {0, 1}: the text positions the UNet attends to, the same for the
        cond and the uncond rows (see `stable_diffusion.tokenize_prompt_pair`); None = all T.

    Returns:
      eps [B, h, w, C] float32.
    """
    b = latents.shape[0]
    context = jnp.concatenate(
        [jnp.broadcast_to(uncond, (b,) + uncond.shape[1:]), jnp.broadcast_to(cond, (b,) + cond.shape[1:])]
    )
    if context_mask is not None:
        context_mask = jnp.broadcast_to(context_mask, (b, context.shape[1]))
        context_mask = jnp.concatenate([context_mask, context_mask])
    timesteps = jnp.full((2 * b,), timestep, jnp.int32)
    eps = eps_fn(jnp.concatenate([latents, latents]), timesteps, context, context_mask)
    eps_uncond, eps_cond = jnp.split(eps.astype(jnp.float32), 2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def sample_latents(
    eps_fn: EpsFn,
    schedule: Schedule,
    noise: jax.Array,
    cond: jax.Array,
    uncond: jax.Array,
    guidance_scale: float | jax.Array,
    context_mask: jax.Array | None = None,
) -> jax.Array:
    """Runs the n steps of `schedule` from `noise` (x at the first timestep; init sigma is 1).

    noise: [B, h, w, C] float32 -> final latents [B, h, w, C] float32 (before the VAE's scaling).
    eps_fn, cond, uncond, context_mask: as in `guided_eps`. The trajectory `sample_trajectory` also returns is
    unused here, and JAX drops an unused scan output, so nothing is stored.
    """
    return sample_trajectory(eps_fn, schedule, noise, cond, uncond, guidance_scale, context_mask)[0]


def sample_trajectory(
    eps_fn: EpsFn,
    schedule: Schedule,
    noise: jax.Array,
    cond: jax.Array,
    uncond: jax.Array,
    guidance_scale: float | jax.Array,
    context_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`sample_latents`, also keeping every step's input latents.

    Returns (final latents [B, h, w, C], trajectory [B, n, h, w, C]: x_i, the latents step i's UNet call saw), float32.
    """

    def body(carry, step):
        latents, prev_x0 = carry
        eps = guided_eps(eps_fn, latents, schedule.timesteps[step], cond, uncond, guidance_scale, context_mask)
        return solver_step(schedule, step, latents, eps, prev_x0), latents

    noise = noise.astype(jnp.float32)
    (latents, _), inputs = jax.lax.scan(body, (noise, jnp.zeros_like(noise)), jnp.arange(schedule.num_steps))
    return latents, jnp.moveaxis(inputs, 0, 1)


def decode_latents(vae, vae_params, latents: jax.Array) -> jax.Array:
    """Final latents [B, h, w, 4] -> images [B, H, W, 3] float32 clamped to [-1, 1]."""
    images = vae.apply({"params": vae_params}, latents / vae.config.scaling_factor)
    return jnp.clip(images, -1.0, 1.0)


def unet_eps_fn(unet, unet_params) -> EpsFn:
    """The EpsFn of a Flax UNet with these params."""
    return lambda x, t, c, m: unet.apply({"params": unet_params}, x, t, c, m)


@functools.partial(jax.jit, static_argnames=("unet", "vae"))
def sample_images(unet, unet_params, vae, vae_params, schedule, noise, cond, uncond, guidance_scale, context_mask=None):
    """Guided DPM-Solver++(2M) sampling and VAE decoding, jitted.

    Args:
      unet, vae: the Flax modules (static: hashed by configuration).
      unet_params, vae_params: their params (e.g. LoRA already merged into the UNet's).
      schedule: `make_schedule(config, n)`.
      noise: initial latents [B, h, w, 4] float32.
      cond, uncond: [1 or B, T, D] prompt / negative-prompt embeddings.
      guidance_scale: scalar (traced: changing it does not recompile).
      context_mask: [1 or B, T] text positions the UNet attends to (both rows), or None (all T).

    Returns:
      images [B, H, W, 3] float32 in [-1, 1]. Compiles once per (step count, batch size, text length T),
      the shapes it sees: pad the text to a fixed T with a context_mask to compile once for all prompts.
      The UNet may compute in bf16; latents stay float32.
    """
    latents = sample_latents(unet_eps_fn(unet, unet_params), schedule, noise, cond, uncond, guidance_scale, context_mask)
    return decode_latents(vae, vae_params, latents)


@functools.partial(jax.jit, static_argnames=("unet", "vae"))
def sample_images_and_trajectory(unet, unet_params, vae, vae_params, schedule, noise, cond, uncond, guidance_scale, context_mask=None):
    """`sample_images`, also returning what `images_from_trajectory` needs: (images [B, H, W, 3] in [-1, 1],
    final latents [B, h, w, 4], trajectory [B, n, h, w, 4]) (`sample_trajectory`)."""
    latents, trajectory = sample_trajectory(
        unet_eps_fn(unet, unet_params), schedule, noise, cond, uncond, guidance_scale, context_mask
    )
    return decode_latents(vae, vae_params, latents), latents, trajectory
