"""Prompt files, the training mix, validation selection and the resumable epoch order."""

import json

import numpy as np
import pytest

from fairdiff_jax import prompts as pr


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def tiny_sets(tmp_path):
    paths = {
        pr.OCCUPATION: write(
            tmp_path / "occ.json",
            {
                "prompt_templates_train": ["T1 a {occupation}", "T2 {occupation}!"],
                "prompt_templates_test": ["V a {occupation}"],
                "occupations_train_set": ["cook", "engineer", "pilot"],
                "occupations_val_set": ["v1", "v2", "v3", "v4", "v5", "v6", "v7"],
                "test_prompts": ["test occ"],
                "comment": "extra keys are ignored",
            },
        ),
        pr.STYLE_AND_CONTEXT: write(
            tmp_path / "style.json", {"train_prompts": ["s1", "s2"], "val_prompts": ["sv1", "sv2", "sv3"], "test_prompts": ["st"]}
        ),
        pr.PERSONAL_DESCRIPTOR: write(
            tmp_path / "pers.json", {"train_prompts": ["p1"], "val_prompts": [f"pv{i}" for i in range(9)], "test_prompts": ["pt"]}
        ),
        pr.SPORTS: write(
            tmp_path / "sports.json", {"train_prompts": ["a", "b", "c"], "val_prompts": ["x"] * 5, "test_prompts": ["y"]}
        ),
    }
    return pr.load_prompt_sets(paths)


def test_training_mix_hand_counted(tiny_sets):
    prompts = pr.training_prompts(tiny_sets)
    # 2 templates x 3 occupations = 6, template-major; + 2 x 6 + 1 x 20 + 3 x 4 = 6 + 12 + 20 + 12 = 50.
    assert len(prompts) == 50
    assert prompts[:6] == ["T1 a cook", "T1 an engineer", "T1 a pilot", "T2 cook!", "T2 engineer!", "T2 pilot!"]
    assert prompts[6:18] == ["s1", "s2"] * 6
    assert prompts[18:38] == ["p1"] * 20
    assert prompts[38:] == ["a", "b", "c"] * 4


def test_validation_selection_hand_counted(tiny_sets):
    # Occupation: test template x val occupations, first 5; style has only 3; personal first 5 of 9;
    # sports 5 -> 5 + 3 + 5 + 5 = 18.
    val = pr.validation_prompts(tiny_sets)
    assert val == (
        ["V a v1", "V a v2", "V a v3", "V a v4", "V a v5"]
        + ["sv1", "sv2", "sv3"]
        + ["pv0", "pv1", "pv2", "pv3", "pv4"]
        + ["x"] * 5
    )


def test_packaged_files_sizes_balance_and_disjointness():
    sets = pr.load_prompt_sets()
    occ = sets[pr.OCCUPATION]
    assert len(occ["prompt_templates_train"]) == 2 and len(occ["prompt_templates_test"]) == 1
    train, val = occ["occupations_train_set"], occ["occupations_val_set"]
    assert (len(train), len(val), len(occ["test_prompts"])) == (400, 28, 50)
    # Test occupations are the ones in the test prompts; the three sets are disjoint.
    template = occ["prompt_templates_test"][0]
    assert len(set(train) | set(val)) == 428
    assert not {pr.fill_template(template, o) for o in train + val} & set(occ["test_prompts"])
    sizes = {k: tuple(len(sets[k][key]) for key in pr.PROMPT_LIST_KEYS) for k in pr.PROMPT_KINDS[1:]}
    assert sizes == {
        pr.STYLE_AND_CONTEXT: (134, 8, 30),
        pr.PERSONAL_DESCRIPTOR: (40, 8, 12),
        pr.SPORTS: (200, 6, 12),
    }
    # Each kind's share of the training list: 800, 804, 800, 800 of 3204 -> all within 25 % +- 0.2 %.
    mix = pr.training_prompts(sets)
    assert len(mix) == 2 * 400 + 134 * 6 + 40 * 20 + 200 * 4 == 3204
    for kind in pr.PROMPT_KINDS[1:]:
        share = sum(p in set(sets[kind]["train_prompts"]) for p in mix) / len(mix)
        assert abs(share - 0.25) < 0.002
    # No test or validation prompt is a training prompt, and every validation kind has >= 5.
    heldout = set(pr.validation_prompts(sets, per_kind=100))
    for kind in pr.PROMPT_KINDS:
        heldout |= set(sets[kind]["test_prompts"])
    assert not heldout & set(mix)
    assert len(pr.validation_prompts(sets)) == 20
    assert pr.load_test_prompts(pr.packaged_prompt_file(pr.SPORTS)) == sets[pr.SPORTS]["test_prompts"]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"train_prompts": ["a"], "val_prompts": ["b"]}, "missing key 'test_prompts'"),
        ({"train_prompts": "a", "val_prompts": ["b"], "test_prompts": ["c"]}, "key 'train_prompts' must be a non-empty list"),
        ({"train_prompts": ["a", 3], "val_prompts": ["b"], "test_prompts": ["c"]}, "key 'train_prompts', item 1"),
        (
            {
                "prompt_templates_train": ["a {job}"],
                "prompt_templates_test": ["b {occupation}"],
                "occupations_train_set": ["x"],
                "occupations_val_set": ["y"],
                "test_prompts": ["z"],
            },
            r"key 'prompt_templates_train', template 'a \{job\}'",
        ),
        ({"prompt_templates_train": ["a {occupation}"]}, "missing key 'prompt_templates_test'"),
        (["a", "b"], "expected a JSON object"),
    ],
)
def test_bad_files_name_file_and_key(tmp_path, content, message):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(pr.PromptFileError, match=message) as info:
        pr.load_prompt_file(path)
    assert "bad.json" in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(pr.PromptFileError, match="not found"):
        pr.load_prompt_file(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(pr.PromptFileError, match="broken.json is not valid JSON"):
        pr.load_prompt_file(broken)
    # A prompt-list file given where the occupation file belongs.
    style = write(tmp_path / "style.json", {"train_prompts": ["a"], "val_prompts": ["b"], "test_prompts": ["c"]})
    with pytest.raises(pr.PromptFileError, match="style.json: missing key 'prompt_templates_train'"):
        pr.load_prompt_sets({pr.OCCUPATION: style})


def test_articles():
    assert [pr.article(w) for w in ("accountant", "umpire", "barber", "HVAC technician", "MRI technologist", "UX designer")] == [
        "an", "an", "a", "an", "an", "a"
    ]
    # Only a standalone article before the field changes ("via" keeps its a).
    assert pr.fill_template("A {occupation} via {occupation}, a {occupation}", "electrician") == (
        "An electrician via electrician, an electrician"
    )


def test_epoch_order_is_seeded_and_resumable():
    prompts = [f"p{i}" for i in range(7)]
    first = pr.epoch_permutation(7, seed=5, epoch=0)
    assert sorted(first) == list(range(7))
    np.testing.assert_array_equal(first, pr.epoch_permutation(7, seed=5, epoch=0))
    assert not np.array_equal(first, pr.epoch_permutation(7, seed=5, epoch=1))
    assert not np.array_equal(first, pr.epoch_permutation(7, seed=6, epoch=0))

    stream = pr.iterate_prompts(prompts, seed=5)
    run = [next(stream) for _ in range(17)]  # 2 epochs of 7 + 3
    second = pr.epoch_permutation(7, seed=5, epoch=1)
    assert [p for _, _, p in run[:7]] == [prompts[i] for i in first]
    assert [p for _, _, p in run[7:14]] == [prompts[i] for i in second]
    assert [(e, i) for e, i, _ in run[12:17]] == [(1, 5), (1, 6), (2, 0), (2, 1), (2, 2)]
    # Resuming at step 12 = (epoch 1, index 5) continues the same sequence.
    assert pr.position_of_step(12, 7) == (1, 5)
    resumed = pr.iterate_prompts(prompts, 5, *pr.position_of_step(12, 7))
    assert [next(resumed) for _ in range(5)] == run[12:17]
    with pytest.raises(ValueError, match="index 7"):
        next(pr.iterate_prompts(prompts, 5, 0, 7))


def test_test_prompts_alone_are_enough_for_generation(tmp_path):
    path = tmp_path / "custom.json"
    path.write_text(json.dumps({"test_prompts": ["a photo of a chef", "a photo of a pilot"]}))
    assert pr.load_test_prompts(path) == ["a photo of a chef", "a photo of a pilot"]
    path.write_text(json.dumps({"test_prompts": []}))
    with pytest.raises(pr.PromptFileError, match=r"custom.json: key 'test_prompts' must be a non-empty list"):
        pr.load_test_prompts(path)
    path.write_text(json.dumps({"val_prompts": ["x"]}))
    with pytest.raises(pr.PromptFileError, match=r"custom.json: missing key 'test_prompts'"):
        pr.load_test_prompts(path)
