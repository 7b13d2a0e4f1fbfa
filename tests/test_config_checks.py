"""Config numbers are checked before anything is loaded: each bad value is refused with a message naming its key."""

import pytest

from fairdiff_jax import config_checks, config_cli


@pytest.mark.parametrize("config_file", ["configs/tiny.py", "configs/miniature.py", "configs/debias_text_encoder.py",
                                         "configs/debias_text_encoder_and_unet.py", "configs/debias_gender_race_age.py"])
def test_shipped_configs_pass(config_file):
    config_checks.check_numbers(config_cli.load_config(config_file))


@pytest.mark.parametrize("override, named", [
    ("train.images_per_prompt=0", "config.train.images_per_prompt must be an integer >= 1, got 0"),
    ("train.micro_batch_size=0", "config.train.micro_batch_size"),
    ("train.generation_batch_size=0", "config.train.generation_batch_size"),
    ("ckpt.every_steps=0", "config.ckpt.every_steps"),
    ("eval.every_steps=0", "config.eval.every_steps"),
    ("train.max_steps=0", "config.train.max_steps"),
    ("train.max_steps=-5", "got -5"),
    ("optim.learning_rate=nan", "config.optim.learning_rate must be a finite number > 0.0, got nan"),
    ("optim.learning_rate=-1e-4", "config.optim.learning_rate"),
    ("optim.b2=1.0", "config.optim.b2"),
    ("loss.factor1.gender=0.0", "config.loss.factor1.gender"),
    ("train.min_denoising_steps=5", "exceeds config.train.max_denoising_steps = 3"),
    ("generate.batch_size=0", "config.generate.batch_size"),
    ("train.dft_gradient=remat", "config.train.dft_gradient must be one of ('stored_trajectory', 'rerun'), got 'remat'"),
])
def test_bad_number_is_refused_by_name(override, named):
    config = config_cli.load_config("configs/tiny.py", [override])
    with pytest.raises(config_checks.ConfigValueError) as error:
        config_checks.check_numbers(config)
    assert named in str(error.value)


def test_nothing_to_train_is_refused():
    config = config_cli.load_config("configs/tiny.py", ["lora.train_text_encoder=false", "lora.train_unet=false"])
    with pytest.raises(config_checks.ConfigValueError, match="nothing to train"):
        config_checks.check_numbers(config)


def test_infinite_learning_rate_is_refused():
    config = config_cli.load_config("configs/tiny.py", ["optim.learning_rate=inf"])
    with pytest.raises(config_checks.ConfigValueError, match="config.optim.learning_rate"):
        config_checks.check_numbers(config)
