"""`python -m fairdiff_jax.train_classifier` end to end on a tiny miniature-world config: trains, resumes from
its checkpoint, evaluates, and exports a .pt that torchvision loads with the Flax model's logits."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from torchvision.models import mobilenetv3

from fairdiff_jax import train_classifier
from fairdiff_jax.classifier import pipeline
from fairdiff_jax.classifier.trainer import to_chips
from fairdiff_jax.judging.mobilenet_v3 import load_mobilenet_v3


def _args(tmp_path, steps):
    return ["train_classifier", "--config", "configs/classifier_miniature.py",
            "--workdir", str(tmp_path / "run"), f"--config.data.data_dir={tmp_path / 'tfds'}",
            "--config.data.builder_config.name=tiny", "--config.data.builder_config.vae_path=",
            "--config.data.builder_config.train_images=24", "--config.data.builder_config.validation_images=0",
            "--config.data.builder_config.test_images=8", "--config.data.eval_splits=('test',)",
            "--config.model.heads=(('gender', 2), ('age', 2))",
            f"--config.optim.steps={steps}", "--config.optim.batch_size=8", "--config.log_every=1",
            "--config.checkpoint_every=2", "--config.eval_batch_size=8"]


@pytest.mark.slow  # compiles the MobileNet's train and eval steps: minutes on a busy 2-core machine
def test_train_resume_export(tmp_path, capsys):
    assert train_classifier.main(_args(tmp_path, 2)) == 0
    assert train_classifier.main(_args(tmp_path, 3)) == 0  # a longer run resumes from step 2
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "step 3/3" in out and "step 1/3" not in out

    export = tmp_path / "run" / "export"
    report = json.loads((export / "classifier.json").read_text())
    assert report["heads"] == [["gender", 2], ["age", 2]] and report["steps"] == 3
    assert 0.0 <= report["held_out"]["test"]["gender_accuracy"] <= 1.0
    assert set(report["held_out"]["test"]) >= {"age_recall/young", "age_recall/old", "loss"}

    module, _ = load_mobilenet_v3(export / "classifier.pt", 4)  # reads the head and width back from the file
    with ocp.StandardCheckpointer() as checkpointer:  # the Flax model as trained (the orbax export)
        variables = checkpointer.restore((export / "variables").absolute())
    model = mobilenetv3.mobilenet_v3_large(num_classes=4, width_mult=0.25)
    model.load_state_dict(torch.load(export / "classifier.pt", weights_only=True), strict=True)
    # The round trip is judged on the held-out faces the classifier is for: its BatchNorm statistics were
    # recomputed from ~23 chips, so uniform noise lands far outside them and float32 rounding is amplified
    # past any fixed tolerance (2026-12-03: 4e-5 of the largest logit on noise; 4.8e-6 on these faces).
    config = train_classifier.parse_args(_args(tmp_path, 3))
    builder = pipeline.make_builder(config.data)
    chips = np.asarray(to_chips(next(pipeline.statistics_batches(builder, "test", 8, 8))))
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(chips.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(jax.jit(module.apply)(variables, chips))
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()), rtol=0)


def test_workdir_that_is_a_file_is_refused_by_name(tmp_path, capsys):
    """--workdir naming a file stops before any data or compilation, with exit 2 and the path in the message;
    so does an unknown config key."""
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    argv = ["train_classifier", "--config", "configs/classifier_miniature.py", "--workdir", str(taken)]
    assert train_classifier.main(argv) == 2
    assert f"--workdir {taken} is a file" in capsys.readouterr().err
    assert train_classifier.main(argv[:3] + ["--config.optim.stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err
