"""Sibling experiment (the original's exp 1): debias binary gender alone, occupation prompts, text-encoder LoRA.

Run (from the repository root):
    python -m fairdiff_jax.train --config configs/debias_gender.py
    # UNet instead: --config.lora.train_text_encoder=false --config.lora.train_unet=true --config.train.micro_batch_size=3

Values from the original exp-1 configs: CelebA gender classifier (2 logits), face-realism weight 1,
factor1 = factor2 = 0.2, confidence 0.9, 24 images per prompt per step (12 per GPU x 2), 10000 steps,
evaluation on 32 images per prompt (see common.occupation_prompts_only for the prompts). The face bank is exp 5's
FairFace bank (point model.face_bank_path elsewhere if you have the original exp-1 one). Expect the
gender gap on occupations to fall well below SD v1-5's (.67 on the exp-5 test prompts,
docs/method.md#what-the-paper-reports); the paper reports no exp-1 numbers to compare with.
"""

from configs import common
from fairdiff_jax import attributes


def get_config():
    config = common.get_base_config()
    config.name = "debias_gender"
    common.occupation_prompts_only(config)
    config.model.classifier_path = (
        config.get_ref("assets_dir") + "/2-trained-classifiers/CelebA_MobileNetLarge_08060852/epoch=9-step=12660_MobileNetLarge.pt"
    )
    config.model.classifier_heads = (("gender", 2),)
    config.target.attributes = ("gender",)
    config.target.marginals = {"gender": attributes.uniform("gender")}
    config.loss.weight_face = 1.0
    config.loss.factor1 = {"gender": 0.2}
    config.loss.factor2 = {"gender": 0.2}
    config.loss.confidence_level = 0.9
    config.train.images_per_prompt = 24
    config.train.max_steps = 10000
    config.eval.images_per_prompt = 32
    return config
