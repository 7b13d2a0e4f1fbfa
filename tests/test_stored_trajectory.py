"""The adjusted-DFT gradient from a stored sampling trajectory (adjusted_dft.images_from_trajectory) equals the one that
re-runs the denoising chain (adjusted_dft.sample_images_adjusted), for the UNet LoRA, the text-encoder LoRA and both,
on the tiny model in float32."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adjusted_dft_gradients import gradient_functions, relative_error, trained_lora
from fairdiff_jax.sd import loader as stable_diffusion
from fairdiff_jax.sd import adjusted_dft
from fairdiff_jax.sd import tiny as tiny_sd

PROMPT = "a photo of the face of a doctor, a person"
STEPS, GUIDANCE, BATCH, RANK = 5, 7.5, 2, 4
# ||g_stored - g_rerun|| / ||g_rerun|| per LoRA tree and for the embeddings: the same math in float32, in
# another order (a reverse scan of per-step VJPs instead of the scan's transpose).
GRAD_RTOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tiny_sd.build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), seed=3)
    sd = stable_diffusion.load_stable_diffusion(folder)
    schedule = sd.schedule(STEPS)
    scales = adjusted_dft.dft_gradient_scales(sd.scheduler_config, schedule)
    ids, text_mask, context_mask = stable_diffusion.tokenize_prompt_pair(sd.tokenizer, PROMPT, pad_to=sd.tokenizer.model_max_length)
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.normal(size=(BATCH, *sd.latent_shape)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(BATCH, sd.image_size, sd.image_size, 3)), jnp.float32)
    stored, rerun = gradient_functions(sd, schedule, ids, text_mask, context_mask, noise, weights, GUIDANCE)
    params = {"unet": sd.unet_params, "vae": sd.vae_params, "text_encoder": sd.text_encoder_params}
    return SimpleNamespace(
        unet_lora=trained_lora(sd.unet_params, "unet", RANK, 1), text_lora=trained_lora(sd.text_encoder_params, "text_encoder", RANK, 2),
        scales=scales, stored=lambda u, t, scales: stored(params, u, t, scales), rerun=lambda u, t: rerun(params, u, t, scales),
    )


@pytest.mark.parametrize(
    "trained",
    # A compile each (~1-2 min): all in the slow pass (the default suite's tests/test_adjusted_dft.py checks the
    # both-LoRA gradient against PyTorch).
    [pytest.param(("unet", "text_encoder"), marks=pytest.mark.slow), pytest.param(("text_encoder",), marks=pytest.mark.slow),
     pytest.param(("unet",), marks=pytest.mark.slow)],
    ids="+".join,
)
def test_stored_trajectory_gradients_equal_the_rerun_chain(setup, trained):
    unet_lora = setup.unet_lora if "unet" in trained else {}
    text_lora = setup.text_lora if "text_encoder" in trained else {}
    (stored_unet, stored_text), stored_images = setup.stored(unet_lora, text_lora, setup.scales)
    (rerun_unet, rerun_text), rerun_images = setup.rerun(unet_lora, text_lora)
    np.testing.assert_allclose(stored_images, rerun_images, rtol=0, atol=1e-5)
    for part, stored, rerun in (("unet", stored_unet, rerun_unet), ("text_encoder", stored_text, rerun_text)):
        if part not in trained:
            assert stored == {} and rerun == {}
            continue
        assert np.linalg.norm(np.concatenate([np.ravel(x) for x in jax.tree.leaves(rerun)])) > 0
        error = relative_error(stored, rerun)
        print(f"{'+'.join(trained)}: {part} LoRA gradient relative error {error:.2e}")
        assert error < GRAD_RTOL, (part, error)


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_the_comparison_sees_a_wrong_gradient_scale(setup):
    """The stored path with the c_i in reverse order misses the rerun's gradient by far more than the tolerance:
    the comparison above can fail."""
    (stored_unet, _), _ = setup.stored(setup.unet_lora, setup.text_lora, setup.scales[::-1])
    (rerun_unet, _), _ = setup.rerun(setup.unet_lora, setup.text_lora)
    assert relative_error(stored_unet, rerun_unet) > 100 * GRAD_RTOL


@pytest.mark.slow  # two gradient-stage compilations: ~5-10 min on a busy 2-core CPU
def test_training_step_gradients_equal_on_both_paths(tmp_path):
    """The whole loss of a training step (tiny config: both LoRAs, micro-batches) differentiated from the stored
    trajectory equals its differentiation through the re-run chain, within the same tolerance."""
    import functools
    from pathlib import Path

    from fairdiff_jax import config_cli
    from fairdiff_jax.judging import judges as judges_lib
    from fairdiff_jax.judging.tiny import build_tiny_assets
    from fairdiff_jax.training import parallel
    from fairdiff_jax.training import step as debias_step
    from fairdiff_jax.training.loop import load_models
    from fairdiff_jax.training.stages import Stages

    root = Path(__file__).resolve().parents[1]
    assets = build_tiny_assets(tmp_path / "assets")
    grads = {}
    for path in ("stored_trajectory", "rerun"):
        config = config_cli.load_config(str(root / "configs" / "tiny.py"), [f"assets_dir={assets}", f"train.dft_gradient={path}"])
        sd, judges, judge_variables = load_models(config)
        mesh = parallel.make_mesh(jax.devices()[:1])
        stages = Stages(sd, judges, config, mesh, judges_lib.make_detector(config))
        frozen = parallel.replicate(debias_step.frozen_weights(sd, judge_variables), mesh)
        lora_tree = {"unet": trained_lora(sd.unet_params, "unet", RANK, 1), "text_encoder": trained_lora(sd.text_encoder_params, "text_encoder", RANK, 2)}
        lora_tree = parallel.replicate(lora_tree, mesh)
        prepared = debias_step.prepare(stages, lora_tree, frozen, PROMPT, config.train.max_denoising_steps, 0, jax.random.key(7))
        assert (prepared.batch.trajectory is not None) == (path == "stored_trajectory")
        loss_fn = functools.partial(debias_step.debias_loss, sd=sd, judges=judges, config=config)
        grad_fn = jax.jit(parallel.make_grad_fn(loss_fn, mesh, config.train.micro_batch_size))
        grads[path], losses, _ = grad_fn(lora_tree, prepared.constants, prepared.batch, jax.random.key(0))
        assert np.isfinite(np.asarray(losses)).all()
    for part in ("unet", "text_encoder"):
        rerun = grads["rerun"][part]
        assert np.linalg.norm(np.concatenate([np.ravel(x) for x in jax.tree.leaves(rerun)])) > 0
        error = relative_error(grads["stored_trajectory"][part], rerun)
        print(f"training step, {part} LoRA gradient relative error {error:.2e}")
        assert error < GRAD_RTOL, (part, error)
