"""DPM-Solver++(2M) + classifier-free guidance against diffusers' DPMSolverMultistepScheduler."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from fairdiff_jax.sd import sampler

# SD v1-5's scheduler_config.json (a PNDM config; the original builds DPMSolverMultistepScheduler from it).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SHAPE = (2, 4, 4, 4)


def _torch_scheduler(final_sigmas_type="sigma_min"):
    return DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG, final_sigmas_type=final_sigmas_type)


def _synthetic_eps(x, t):
    """A model output that depends on the sample and the timestep, identical in numpy and torch."""
    return 0.8 * np.tanh(x) + 0.3 * np.cos(x * (1 + t / 500.0))


def _torch_trajectory(num_steps, x, final_sigmas_type="sigma_min"):
    scheduler = _torch_scheduler(final_sigmas_type)
    scheduler.set_timesteps(num_steps)
    xs = []
    sample = torch.from_numpy(x)
    for t in scheduler.timesteps:
        eps = torch.from_numpy(_synthetic_eps(sample.numpy(), int(t)).astype(np.float32))
        sample = scheduler.step(eps, t, sample).prev_sample
        xs.append(sample.numpy())
    return scheduler.timesteps.numpy(), np.stack(xs)


def _jax_trajectory(num_steps, x):
    schedule = sampler.make_schedule(sampler.SchedulerConfig(), num_steps)
    step = jax.jit(sampler.solver_step)
    latents, prev_x0, xs = jnp.asarray(x), jnp.zeros(x.shape), []
    for i in range(num_steps):
        t = int(schedule.timesteps[i])
        eps = jnp.asarray(_synthetic_eps(np.asarray(latents), t).astype(np.float32))
        latents, prev_x0 = step(schedule, i, latents, eps, prev_x0)
        xs.append(np.asarray(latents))
    return np.asarray(schedule.timesteps), np.stack(xs)


@pytest.mark.parametrize("num_steps", [1, 5, 14, 15, 20, 25])
def test_every_step_matches_diffusers(num_steps):
    x = np.random.default_rng(num_steps).normal(size=SHAPE).astype(np.float32)
    want_t, want = _torch_trajectory(num_steps, x)
    got_t, got = _jax_trajectory(num_steps, x)
    np.testing.assert_array_equal(got_t, want_t)
    # float32 both sides; coefficients here in float64 then rounded, diffusers' in float32.
    # Measured max abs diff 2-3e-5 with latents growing to ~30 under this synthetic model (~1e-6 relative).
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_final_sigma_matters():
    """The 'zero' final sigma of current diffusers is a different sampler: the check above can tell them apart."""
    x = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    _, zero = _torch_trajectory(20, x, final_sigmas_type="zero")
    _, ours = _jax_trajectory(20, x)
    assert np.abs(zero[-1] - ours[-1]).max() > 1e-2


def test_timesteps_formula():
    np.testing.assert_array_equal(sampler.inference_timesteps(sampler.SchedulerConfig(), 4), [999, 749, 500, 250])
    with pytest.raises(ValueError, match="must be >= 1"):
        sampler.inference_timesteps(sampler.SchedulerConfig(), 0)


def test_guided_scan_matches_diffusers_loop():
    """sample_latents (lax.scan, one batched call for uncond+cond) vs a diffusers loop with two model calls."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=SHAPE).astype(np.float32)
    cond = rng.normal(size=(1, 3, 4)).astype(np.float32)
    uncond = rng.normal(size=(1, 3, 4)).astype(np.float32)
    g, num_steps = 7.5, 6

    def model(latents, t, context):  # numpy: eps from latents [B,h,w,C], t [B], context [B,L,D]
        return np.tanh(0.5 * latents + context.mean(axis=1)[:, None, None, :] * (1 + t[:, None, None, None] / 1000.0))

    eps_fn = lambda lat, t, ctx, ctx_mask: jnp.tanh(0.5 * lat + ctx.mean(axis=1)[:, None, None, :] * (1 + t[:, None, None, None] / 1000.0))
    got = jax.jit(sampler.sample_latents, static_argnums=0)(
        eps_fn, sampler.make_schedule(sampler.SchedulerConfig(), num_steps), jnp.asarray(x), jnp.asarray(cond), jnp.asarray(uncond), g
    )

    scheduler = _torch_scheduler()
    scheduler.set_timesteps(num_steps)
    sample = torch.from_numpy(x)
    tb = lambda t: np.full((SHAPE[0],), int(t))
    for t in scheduler.timesteps:
        s = sample.numpy()
        eps_u = model(s, tb(t), np.repeat(uncond, SHAPE[0], 0))
        eps_c = model(s, tb(t), np.repeat(cond, SHAPE[0], 0))
        eps = torch.from_numpy((eps_u + g * (eps_c - eps_u)).astype(np.float32))
        sample = scheduler.step(eps, t, sample).prev_sample
    # Guidance 7.5 drives these synthetic latents to ~55; measured max abs diff 4.2e-5 (~1e-6 relative).
    np.testing.assert_allclose(np.asarray(got), sample.numpy(), atol=1e-5, rtol=1e-5)


def test_scheduler_config(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD15_SCHEDULER_CONFIG))
    assert sampler.SchedulerConfig.from_json(path) == sampler.SchedulerConfig()
    path.write_text(json.dumps(dict(_torch_scheduler().config)))  # a saved DPMSolverMultistepScheduler config
    assert sampler.SchedulerConfig.from_json(path) == sampler.SchedulerConfig()
    path.write_text(json.dumps(dict(SD15_SCHEDULER_CONFIG, prediction_type="v_prediction")))
    with pytest.raises(ValueError, match=r"scheduler_config.json: prediction_type = 'v_prediction' is not supported"):
        sampler.SchedulerConfig.from_json(path)
    path.write_text(json.dumps(dict(SD15_SCHEDULER_CONFIG, beta_schedule="squaredcos_cap_v2")))
    with pytest.raises(ValueError, match=r"beta_schedule = 'squaredcos_cap_v2' is not supported"):
        sampler.SchedulerConfig.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read scheduler config"):
        sampler.SchedulerConfig.from_json(path)
    with pytest.raises(FileNotFoundError, match="scheduler config not found"):
        sampler.SchedulerConfig.from_json(tmp_path / "absent.json")


def test_context_mask_reaches_the_model():
    """Text padded with junk plus a context mask gives the unpadded result (the mask reaches eps_fn for
    both the cond and the uncond rows); without the mask the junk shows."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=SHAPE).astype(np.float32))
    cond, uncond = (jnp.asarray(rng.normal(size=(1, 3, 4)).astype(np.float32)) for _ in range(2))
    junk = lambda c: jnp.concatenate([c, jnp.asarray(rng.normal(size=(1, 4, 4)).astype(np.float32))], axis=1)
    mask = jnp.asarray([[1, 1, 1, 0, 0, 0, 0]])

    def eps_fn(lat, t, ctx, ctx_mask):  # tanh of the latents plus the mean of the visible text tokens
        w = jnp.ones(ctx.shape[:2]) if ctx_mask is None else ctx_mask.astype(jnp.float32)
        assert w.shape == ctx.shape[:2]
        mean = (ctx * w[..., None]).sum(1) / w.sum(1, keepdims=True)
        return jnp.tanh(0.5 * lat + mean[:, None, None, :] * (1 + t[:, None, None, None] / 1000.0))

    run = lambda c, u, m: np.asarray(
        sampler.sample_latents(eps_fn, sampler.make_schedule(sampler.SchedulerConfig(), 4), x, c, u, 7.5, m)
    )
    want = run(cond, uncond, None)
    np.testing.assert_allclose(run(junk(cond), junk(uncond), mask), want, atol=1e-5, rtol=1e-6)
    assert np.abs(run(junk(cond), junk(uncond), None) - want).max() > 1e-2
