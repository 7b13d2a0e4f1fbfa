"""`python -m fairdiff_jax.before_after`: the gap-reduction arithmetic by hand, and the whole command on the
miniature world's assets (committed under assets/miniature), where a LoRA that changes nothing must give the
same table before and after (bias, fidelity, consistency, face share), a similarity of 1 to the original images,
and side-by-side grids of identical halves."""

import csv
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from fairdiff_jax.eval import before_after, tables
from fairdiff_jax.sd import lora
from fairdiff_jax.sd.loader import load_stable_diffusion
from fairdiff_jax.training import step as debias_step

ROOT = Path(__file__).resolve().parents[1]
MINIATURE = ROOT / "assets" / "miniature"


def test_gap_reduction_is_one_minus_after_over_before():
    stat = lambda mean: tables.MeanStd(mean, 0.1, 3)  # noqa: E731
    before = {"gender_bias": stat(0.8), "race_bias": stat(0.4), "gender_race_bias": stat(0.0), "clip_i": stat(1.0)}
    after = {"gender_bias": stat(0.2), "race_bias": stat(0.5), "gender_race_bias": stat(0.0), "clip_i": stat(0.9)}
    reduction = before_after.gap_reduction(before, after)
    # gender: 1 - 0.2 / 0.8; race grew by a quarter; a gap that was 0 has no reduction; CLIP-I is no gap.
    assert reduction == pytest.approx({"gender_bias": 0.75, "race_bias": -0.25})
    table = before_after.reduction_markdown({"all": reduction})
    assert "| prompts | gender bias | race bias |\n" in table and "| all | 75% | -25% |\n" in table
    table = before_after.reduction_markdown({"all": reduction}, {"all": {"gender_bias": 0.9}})
    assert "| all | 75% (of 90%) | -25% |\n" in table


def test_balanced_floor_averages_the_sampling_floor_over_prompts_with_faces():
    rows = [{"num_faces": 1, "gender_bias": 1.0, "gender_race_bias": 0.25},
            {"num_faces": 2, "gender_bias": 0.0, "gender_race_bias": 0.0},
            {"num_faces": 0, "gender_bias": math.nan, "gender_race_bias": math.nan}]
    # One face: 2 / K (K = 2, 8); two faces over two classes: 0.5. The faceless prompt has no bias to floor.
    floor = before_after.balanced_floor(rows)
    assert {n: stat.mean for n, stat in floor.items()} == pytest.approx(
        {"gender_bias": (1.0 + 0.5) / 2, "gender_race_bias": (0.25 + 0.21875) / 2})
    assert {stat.num_prompts for stat in floor.values()} == {2}


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_a_lora_that_changes_nothing_leaves_the_table_unchanged(tmp_path, capsys):
    sd = load_stable_diffusion(MINIATURE / "sd")
    zero = debias_step.init_lora(jax.random.key(0), sd, 2, True, False)["text_encoder"]  # up = 0: no change
    lora.save_original(zero, tmp_path / "text_encoder_lora.pth", "text_encoder")
    out = tmp_path / "out"
    argv = [
        "--config", str(ROOT / "configs" / "miniature.py"), "--out", str(out),
        "--text_encoder_lora", str(tmp_path / "text_encoder_lora.pth"),
        "--images_per_prompt", "4", "--prompts_per_kind", "1", "--kinds", "occupation", "sports",
        "--config.generate.num_denoising_steps=4", "--config.generate.batch_size=4",
        f"--config.assets_dir={MINIATURE}",  # its evaluation judges: eval_detector.safetensors, scene_classifier.pt
    ]
    reductions = before_after.main(argv)
    for model in before_after.MODELS:
        for kind in ("occupation", "sports"):
            assert len(list((out / model / kind / "prompt_0").glob("img_*.jpg"))) == 4
            assert (out / "eval" / model / kind / "test_results.pkl").is_file()
    # The same images on both sides: every gap the original has is still there, all of it.
    assert reductions and all(value == 0.0 for value in reductions.values())
    with open(out / "eval" / "debiased" / "occupation" / "per_prompt.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert math.isclose(float(row["clip_i"]), 1.0, abs_tol=1e-5) and math.isclose(float(row["dino"]), 1.0, abs_tol=1e-5)
    with open(out / "eval" / "original" / "occupation" / "per_prompt.csv", newline="") as f:
        (original_row,) = list(csv.DictReader(f))
    for metric in ("fidelity_precision", "fidelity_recall", "consistency", "face_share", "gender_race_bias"):
        assert original_row[metric] == row[metric], metric  # the same images against the same world renders
    report = (out / "comparison.md").read_text()
    assert report in capsys.readouterr().out
    # Nothing removed, beside what a perfectly balanced set with these faces would have removed.
    assert re.search(r"\| all held-out prompts \| 0% \(of \d+%\) \| 0% \(of \d+%\) \| 0% \(of \d+%\) \|", report)
    assert "fidelity precision | fidelity recall | consistency (scene accuracy) | face share" in report
    # Side-by-side grids, one per kind: 1 prompt x 4 images per half at 64 px, a 12 px gap, a 16 px header;
    # the two halves are the same images here.
    for kind in ("occupation", "sports"):
        grid = np.asarray(Image.open(out / f"before_after_{kind}.png"))
        assert grid.shape == (16 + 64, 2 * 4 * 64 + 12, 3)
        np.testing.assert_array_equal(grid[16:, : 4 * 64], grid[16:, 4 * 64 + 12:])

    # A retrained LoRA (another file content) must not be judged by the old LoRA's images: refused before sampling.
    retrained = jax.tree.map(lambda x: x + 0.01, zero)
    lora.save_original(retrained, tmp_path / "text_encoder_lora.pth", "text_encoder")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        before_after.main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{out / 'debiased' / 'occupation'} holds images made otherwise (lora_sha256" in message


def test_missing_lora_and_bad_values_are_refused_before_loading(tmp_path, capsys):
    config = str(ROOT / "configs" / "miniature.py")
    with pytest.raises(SystemExit):
        before_after.main(["--config", config, "--out", str(tmp_path)])
    assert "--text_encoder_lora and/or --unet_lora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        before_after.main(["--config", config, "--out", str(tmp_path), "--text_encoder_lora", str(tmp_path / "none.pth"),
                           "--config.no_such_key=1"])
    assert "no_such_key" in capsys.readouterr().err
    for bad, named in ((["--prompts_per_kind", "-1"], "--prompts_per_kind must be >= 1, got -1"),
                       (["--images_per_prompt", "0"], "--images_per_prompt must be >= 1, got 0"),
                       (["--config.generate.batch_size=0"], "config.generate.batch_size must be an integer >= 1")):
        with pytest.raises(SystemExit):
            before_after.main(["--config", config, "--out", str(tmp_path), "--text_encoder_lora",
                               str(tmp_path / "none.pth"), *bad])
        assert named in capsys.readouterr().err
