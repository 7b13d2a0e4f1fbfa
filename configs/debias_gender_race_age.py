"""Sibling experiment (the original's exp 4): gender x race x age, with a non-uniform age target
(75% young, 25% old), occupation prompts, text-encoder LoRA.

Run (from the repository root):
    python -m fairdiff_jax.train --config configs/debias_gender_race_age.py

Values from the original exp-4 configs: a FairFace gender/race/age classifier with 8 logits (gender 2,
race 4, age 2: 0 young, 1 old), factor1 age 0.6, factor2 age 0.3, confidence 0.75, 40 images per
prompt per step, 15000 steps, evaluation on 48 images per prompt (see common.occupation_prompts_only).
The joint target is uniform over gender x race times (0.75, 0.25) over age: j = 8 g + 2 r + a. Expect
the gender and race gaps to fall as in experiment 5 and the old share to move towards 25%; the paper
reports no exp-4 numbers to compare with.
"""

from configs import common
from fairdiff_jax import attributes


def get_config():
    config = common.get_base_config()
    config.name = "debias_gender_race_age"
    common.occupation_prompts_only(config)
    config.model.classifier_path = (
        config.get_ref("assets_dir")
        + "/2-trained-classifiers/fairface_MobileNetLarge_GenderRace4Age2_09151907/epoch=9-step=3380_MobileNetLarge.pt"
    )
    config.model.classifier_heads = attributes.TEST_CLASSIFIER_HEADS
    config.target.attributes = ("gender", "race", "age")
    config.target.marginals = {"gender": attributes.uniform("gender"), "race": attributes.uniform("race"), "age": attributes.YOUNG_OLD_TARGET}
    config.loss.factor1 = {"gender": 0.2, "race": 0.6, "age": 0.6}
    config.loss.factor2 = {"gender": 0.2, "race": 0.3, "age": 0.3}
    config.loss.confidence_level = 0.75
    return config
