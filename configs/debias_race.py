"""Sibling experiment (the original's exp 6): debias four race classes alone, occupation prompts, text-encoder LoRA.

Run (from the repository root):
    python -m fairdiff_jax.train --config configs/debias_race.py

Values from the original exp-6 configs: the gender x race FairFace classifier (only its race logits
used), image-semantics weight 6, factor1 0.6, factor2 0.3, confidence 0.9, 32 images per prompt per step
(16 per GPU x 2), 12000 steps, evaluation on 32 images per prompt (see
common.occupation_prompts_only for the prompts). Expect the race gap on occupations to fall well below SD v1-5's (.42 on the exp-5 test
prompts, docs/method.md#what-the-paper-reports); the paper reports no exp-6 numbers to compare with.
"""

from configs import common
from fairdiff_jax import attributes


def get_config():
    config = common.get_base_config()
    config.name = "debias_race"
    common.occupation_prompts_only(config)
    config.target.attributes = ("race",)
    config.target.marginals = {"race": attributes.uniform("race")}
    config.loss.weight_img = 6.0
    config.loss.factor1 = {"race": 0.6}
    config.loss.factor2 = {"race": 0.3}
    config.loss.confidence_level = 0.9
    config.train.images_per_prompt = 32
    config.train.max_steps = 12000
    config.eval.images_per_prompt = 32
    return config
