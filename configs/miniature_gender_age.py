"""The miniature world, debiasing gender x age jointly, with a classifier trained in JAX (issue: bring your own
attribute). The shipped loss classifier (assets/miniature/classifier.pt) has no age head; this run's
classifier is the one `python -m fairdiff_jax.train_classifier --config configs/classifier_miniature.py` writes
(gender 2, race 4, age 2 logits, side by side: attributes.TEST_CLASSIFIER_HEADS), and the target is uniform over
the 4 gender x age classes (j = 2 g + a). Everything else is configs/miniature.py's.

Run (from the repository root; README.md, "Train your own face-attribute classifier"):
    python -m fairdiff_jax.train_classifier --config configs/classifier_miniature.py
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python -m fairdiff_jax.train --config configs/miniature_gender_age.py --workdir workdirs/miniature_gender_age

The evaluation (training's periodic one and `python -m fairdiff_jax.before_after --config` this file) then
reports the gender, age and gender x age gaps (config.target.attributes), with fidelity measured against the
world's renders balanced over gender x race x age.
"""

from configs import miniature
from fairdiff_jax import attributes


def get_config():
    config = miniature.get_config()
    config.name = "miniature_gender_age"
    config.model.classifier_path = "workdirs/classifier_miniature/export/classifier.pt"
    config.model.classifier_heads = attributes.TEST_CLASSIFIER_HEADS
    config.target.attributes = ("gender", "age")
    config.target.marginals = {name: attributes.uniform(name) for name in config.target.attributes}
    # The original's age weights in its gender x race x age experiment (race's values). Measured here with gender's
    # 0.2 / 0.2 instead: less of the age gap removed and fidelity lost (README.md).
    config.loss.factor1 = {"gender": 0.2, "age": 0.6}
    config.loss.factor2 = {"gender": 0.2, "age": 0.3}
    return config
