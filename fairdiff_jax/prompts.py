"""Prompt sets (docs/method.md#prompts): loading and validating the JSON files, the training mix, the epoch order
and the validation selection.

Two file schemas (lists of strings under each key):
    occupation.json            prompt_templates_train, prompt_templates_test (templates holding
                               "{occupation}"), occupations_train_set, occupations_val_set,
                               test_prompts
    the three other kinds      train_prompts, val_prompts, test_prompts
The packaged files live in fairdiff_jax/data/prompts/ (see PROVENANCE.md there).

Training set = train templates x train occupations (template-major) + style/context train prompts
x 6 + personal-descriptor train prompts x 20 + sports train prompts x 4, so the four kinds come up
about equally often; one prompt per step, each epoch a fresh shuffle. The shuffle of epoch e is a
pure function of (seed, e), so a run resumes from its (epoch, index) position alone.
"""

import json
import re
import string
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

PROMPTS_DIR = Path(__file__).parent / "data" / "prompts"

OCCUPATION = "occupation"
STYLE_AND_CONTEXT = "occupation_w_style_and_context"
PERSONAL_DESCRIPTOR = "personal_descriptor"
SPORTS = "sports"
PROMPT_KINDS = (OCCUPATION, STYLE_AND_CONTEXT, PERSONAL_DESCRIPTOR, SPORTS)
# How often each kind's train prompts enter the training list (the original's balance).
TRAIN_REPEATS = {OCCUPATION: 1, STYLE_AND_CONTEXT: 6, PERSONAL_DESCRIPTOR: 20, SPORTS: 4}

OCCUPATION_KEYS = (
    "prompt_templates_train",
    "prompt_templates_test",
    "occupations_train_set",
    "occupations_val_set",
    "test_prompts",
)
PROMPT_LIST_KEYS = ("train_prompts", "val_prompts", "test_prompts")
_TEMPLATE_KEYS = ("prompt_templates_train", "prompt_templates_test")


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable or off-schema: the message names the file and key."""


def packaged_prompt_file(kind: str) -> Path:
    """Path of the packaged prompt file of `kind` (one of PROMPT_KINDS)."""
    if kind not in PROMPT_KINDS:
        raise PromptFileError(f"unknown prompt kind {kind!r}; expected one of {PROMPT_KINDS}")
    return PROMPTS_DIR / f"{kind}.json"


def load_prompt_file(path: str | Path, kind: str | None = None) -> dict[str, list[str]]:
    """Reads and validates a prompt file; returns {key: list of strings} for the schema's keys.

    The schema is the occupation one for kind OCCUPATION, the prompt-list one for the other kinds;
    with kind None, the occupation one if the file has a template or occupation-set key. Every
    required key must hold a non-empty list of non-empty strings; templates must use exactly the one
    field "{occupation}". Extra keys are ignored.
    """
    path = Path(path)
    data = _read_json_object(path)
    if kind is None:
        is_occupation = any(k in data for k in OCCUPATION_KEYS if k != "test_prompts")
    else:
        is_occupation = kind == OCCUPATION
    return _checked_lists(path, data, OCCUPATION_KEYS if is_occupation else PROMPT_LIST_KEYS)


def _read_json_object(path: Path) -> dict:
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise PromptFileError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def _checked_lists(path: Path, data: dict, keys: Sequence[str]) -> dict[str, list[str]]:
    """{key: list} for `keys`, each a non-empty list of non-empty strings (templates: one {occupation})."""
    prompts = {}
    for key in keys:
        if key not in data:
            raise PromptFileError(f"{path}: missing key {key!r} (expected keys: {', '.join(keys)})")
        values = data[key]
        if not isinstance(values, list) or not values:
            raise PromptFileError(f"{path}: key {key!r} must be a non-empty list of strings")
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                raise PromptFileError(f"{path}: key {key!r}, item {i} is {value!r}, not a non-empty string")
        if key in _TEMPLATE_KEYS:
            for template in values:
                fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
                if fields != {"occupation"}:
                    raise PromptFileError(
                        f"{path}: key {key!r}, template {template!r} must use exactly the field "
                        f"{{occupation}}, found {sorted(fields)}"
                    )
        prompts[key] = list(values)
    return prompts


def article(noun_phrase: str) -> str:
    """'an' before a vowel letter or a vowel-sounding acronym (HVAC, MRI), else 'a'.

    Spelling-based: words like "hour" or "university" are not handled (none occur in the
    packaged occupations)."""
    word = noun_phrase.split()[0]
    if word.isupper() and len(word) > 1:
        return "an" if word[0] in "AEFHILMNORSX" else "a"
    return "an" if word[0].lower() in "aeiou" else "a"


def fill_template(template: str, occupation: str) -> str:
    """template.format(occupation=...), with the template's "a {occupation}" turned into
    "an {occupation}" where `article` says so (the original left e.g. "a accountant")."""
    if article(occupation) == "an":
        template = re.sub(r"\b([Aa]) \{occupation\}", r"\1n {occupation}", template)
    return template.format(occupation=occupation)


def occupation_prompts(templates: Sequence[str], occupations: Sequence[str]) -> list[str]:
    """All template x occupation prompts, template-major (the original's order)."""
    return [fill_template(t, o) for t in templates for o in occupations]


def load_prompt_sets(paths: Mapping[str, str | Path] | None = None) -> dict[str, dict[str, list[str]]]:
    """{kind: validated file contents} for all four kinds; `paths` overrides packaged files by kind."""
    paths = dict(paths or {})
    unknown = set(paths) - set(PROMPT_KINDS)
    if unknown:
        raise PromptFileError(f"unknown prompt kinds {sorted(unknown)}; expected {PROMPT_KINDS}")
    return {
        kind: load_prompt_file(paths.get(kind, packaged_prompt_file(kind)), kind) for kind in PROMPT_KINDS
    }


def training_prompts(
    prompt_sets: Mapping[str, Mapping[str, list[str]]], repeats: Mapping[str, int] = TRAIN_REPEATS
) -> list[str]:
    """The training list: occupation templates x occupations, then each other kind's train prompts
    repeated `repeats[kind]` times (list repetition, as the original)."""
    occupation = prompt_sets[OCCUPATION]
    prompts = occupation_prompts(occupation["prompt_templates_train"], occupation["occupations_train_set"])
    prompts *= repeats.get(OCCUPATION, 1)
    for kind in (STYLE_AND_CONTEXT, PERSONAL_DESCRIPTOR, SPORTS):
        prompts += prompt_sets[kind]["train_prompts"] * repeats[kind]
    return prompts


def validation_prompts(prompt_sets: Mapping[str, Mapping[str, list[str]]], per_kind: int = 5) -> list[str]:
    """First `per_kind` prompts of each kind: occupation ones from test templates x val occupations."""
    occupation = prompt_sets[OCCUPATION]
    prompts = occupation_prompts(
        occupation["prompt_templates_test"], occupation["occupations_val_set"]
    )[:per_kind]
    for kind in (STYLE_AND_CONTEXT, PERSONAL_DESCRIPTOR, SPORTS):
        prompts += prompt_sets[kind]["val_prompts"][:per_kind]
    return prompts


def load_test_prompts(path: str | Path) -> list[str]:
    """The `test_prompts` of a prompt file, for generation and evaluation: any JSON object with that key
    (both training schemas have it; a file holding only `test_prompts` is enough)."""
    path = Path(path)
    return _checked_lists(path, _read_json_object(path), ("test_prompts",))["test_prompts"]


def epoch_permutation(num_prompts: int, seed: int, epoch: int) -> np.ndarray:
    """[num_prompts] int64 order of epoch `epoch`: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_prompts)


def position_of_step(step: int, num_prompts: int) -> tuple[int, int]:
    """(epoch, index within the epoch) of global step `step`, one prompt per step."""
    return divmod(step, num_prompts)


def iterate_prompts(
    prompts: Sequence[str], seed: int, epoch: int = 0, index: int = 0
) -> Iterator[tuple[int, int, str]]:
    """Yields (epoch, index, prompt) forever from position (epoch, index), shuffling every epoch.

    Checkpoint the position after the last prompt used (index + 1, or the next epoch) and pass it
    back here to resume with the same sequence.
    """
    if not prompts:
        raise ValueError("iterate_prompts needs at least one prompt")
    if not 0 <= index < len(prompts):
        raise ValueError(f"index {index} outside an epoch of {len(prompts)} prompts")
    while True:
        order = epoch_permutation(len(prompts), seed, epoch)
        for i in range(index, len(prompts)):
            yield epoch, i, prompts[order[i]]
        epoch, index = epoch + 1, 0
