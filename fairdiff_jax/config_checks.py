"""The config's numbers, checked before anything is loaded or compiled.

    config_checks.check_numbers(config)   # ConfigValueError: "config.train.micro_batch_size must be an integer >= 1, got 0"

A zero batch size, a NaN learning rate or a zero checkpoint interval would otherwise fail deep inside a compiled
step (ZeroDivisionError, an empty max()) or, worse, train and export a LoRA of NaN with exit 0. Every rule names
its key, so the message says what to change. Keys that a config does not have are skipped (older configs).
"""

import math
from typing import Any, Callable

from ml_collections import config_dict


class ConfigValueError(ValueError):
    """A config number out of its range; the message names the key, the rule and the value."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def finite_at_least(low: float, strict: bool = False) -> tuple[Callable[[Any], bool], str]:
    if strict:
        return (lambda v: _is_number(v) and v > low), f"a finite number > {low}"
    return (lambda v: _is_number(v) and v >= low), f"a finite number >= {low}"


def finite_in(low: float, high: float, high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    if high_open:
        return (lambda v: _is_number(v) and low <= v < high), f"a finite number in [{low}, {high})"
    return (lambda v: _is_number(v) and low <= v <= high), f"a finite number in [{low}, {high}]"


def finite() -> tuple[Callable[[Any], bool], str]:
    return _is_number, "a finite number"


def one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value in choices), f"one of {choices}"


# (dotted key, (rule, what the rule asks for)); a key ending in '.*' applies the rule to every value of a dict.
RULES = (
    ("optim.learning_rate", finite_at_least(0.0, strict=True)),
    ("optim.b1", finite_in(0.0, 1.0, high_open=True)),
    ("optim.b2", finite_in(0.0, 1.0, high_open=True)),
    ("optim.eps", finite_at_least(0.0, strict=True)),
    ("optim.weight_decay", finite_at_least(0.0)),
    ("optim.ema_decay", finite_in(0.0, 1.0)),
    ("optim.decay_steps", integer_at_least(0)),
    ("lora.rank", integer_at_least(1)),
    ("model.guidance_scale", finite()),
    ("train.max_steps", integer_at_least(1)),
    ("train.images_per_prompt", integer_at_least(1)),
    ("train.micro_batch_size", integer_at_least(1)),
    ("train.generation_batch_size", integer_at_least(1)),
    ("train.min_denoising_steps", integer_at_least(1)),
    ("train.max_denoising_steps", integer_at_least(1)),
    ("train.log_every_steps", integer_at_least(1)),
    ("train.plot_every_steps", integer_at_least(1)),
    ("train.max_bad_steps", integer_at_least(1)),
    ("train.dft_gradient", one_of("stored_trajectory", "rerun")),
    ("loss.weight_img", finite_at_least(0.0)),
    ("loss.weight_face", finite_at_least(0.0)),
    ("loss.factor1.*", finite_at_least(0.0, strict=True)),
    ("loss.factor2.*", finite_at_least(0.0, strict=True)),
    ("loss.uncertainty_threshold", finite_in(0.0, 1.0)),
    ("loss.confidence_level", finite_in(0.0, 1.0)),
    ("loss.img_size_small", integer_at_least(1)),
    ("loss.ot_num_samples", integer_at_least(1)),
    ("faces.size_face", integer_at_least(1)),
    ("faces.size_aligned_face", integer_at_least(1)),
    ("faces.expand_coef", finite_at_least(0.0)),
    ("ckpt.every_steps", integer_at_least(1)),
    ("ckpt.keep", integer_at_least(1)),
    ("ckpt.permanent_every_steps", integer_at_least(0)),
    ("eval.every_steps", integer_at_least(1)),
    ("eval.images_per_prompt", integer_at_least(1)),
    ("eval.batch_size", integer_at_least(1)),
    ("eval.num_denoising_steps", integer_at_least(1)),
    ("eval.prompts_per_kind", integer_at_least(0)),
    ("eval.fidelity_k", integer_at_least(1)),
    ("eval.reference_images_per_prompt", integer_at_least(1)),
    ("generate.num_denoising_steps", integer_at_least(1)),
    ("generate.images_per_prompt", integer_at_least(1)),
    ("generate.batch_size", integer_at_least(1)),
)


def _values(config: config_dict.ConfigDict, key: str) -> list[tuple[str, Any]]:
    """[(full key, value)] of `key` in config ('a.b.*': every entry of the dict a.b); [] where it is absent."""
    node: Any = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part == "*":
            prefix = ".".join(parts[:i])
            return [(f"{prefix}.{name}", value) for name, value in node.items()]
        if not isinstance(node, config_dict.ConfigDict) or part not in node:
            return []
        node = node[part]
    return [(key, node)]


def check_numbers(config: config_dict.ConfigDict) -> None:
    """Raises ConfigValueError for the first number out of its range (RULES) or an inconsistent pair."""
    for key, (ok, wanted) in RULES:
        for name, value in _values(config, key):
            if not ok(value):
                raise ConfigValueError(f"config.{name} must be {wanted}, got {value!r}")
    train = config.get("train")
    if train is not None and "min_denoising_steps" in train and train.min_denoising_steps > train.max_denoising_steps:
        raise ConfigValueError(f"config.train.min_denoising_steps = {train.min_denoising_steps} exceeds "
                               f"config.train.max_denoising_steps = {train.max_denoising_steps}")
    lora = config.get("lora")
    if lora is not None and "train_unet" in lora and not (lora.train_text_encoder or lora.train_unet):
        raise ConfigValueError("config.lora.train_text_encoder and config.lora.train_unet are both false: nothing to train")
