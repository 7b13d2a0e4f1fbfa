"""The miniature world's ground truth for evaluation: reference renders of a prompt with every gender x race
(x age) class equally represented (the fidelity metric's reference set: a debiased model that draws a balanced
population of the prompt's scene must not be penalised for its attributes), and the scene a prompt asks for
(the consistency judge's truth).

    renders = balanced_renders("a photo of the face of a judge, a person", 64, seed=0)   # 8 of each class
    scene_truth("a watercolor painting of the face of a judge at night")
    # {'subject': 'judge', 'style': 'watercolor painting', 'context': 'at night'}
"""

import zlib
from typing import Optional

import numpy as np

from fairdiff_jax.miniature import drawing, world


def class_prompt(prompt: str, gender: int, race: int, age: Optional[int] = None) -> str:
    """`prompt` with attribute words that fix gender and race, and age unless it is None (the world reads them
    anywhere in a prompt); ValueError naming the prompt when it already fixes one of them, or when the words
    would change its scene."""
    spec = world.parse_prompt(prompt)
    if spec.gender is not None or spec.race is not None or (age is not None and spec.age is not None):
        raise ValueError(f"prompt {prompt!r} fixes gender, race or age: it has no balanced reference")
    words = ([world.AGES[age]] if age is not None else []) + [world.GENDERS[gender], world.RACES[race]]
    fixed = f"{prompt}, {' '.join(words)}"
    fixed_spec = world.parse_prompt(fixed)
    want = (spec.subject.name, spec.style, spec.context, gender, race, spec.age if age is None else age)
    if (fixed_spec.subject.name, fixed_spec.style, fixed_spec.context, fixed_spec.gender, fixed_spec.race,
            fixed_spec.age) != want:
        raise ValueError(f"prompt {prompt!r}: attribute words change how the world reads it ({fixed!r})")
    return fixed


def balanced_renders(prompt: str, num_images: int, seed: int = 0, balance_age: bool = False) -> drawing.Renders:
    """num_images renders of `prompt`'s scene, image i of gender x race class i mod 8 (j = 4 g + r), so every class
    has the same count when num_images is a multiple of 8; with balance_age, of gender x race x age class i mod 16
    (j = 8 a + 4 g + r; for a model debiased towards a balanced age) instead of the age the prompt's subject
    draws. Deterministic in (prompt, num_images, seed, balance_age)."""
    ages = range(len(world.AGES)) if balance_age else (None,)
    prompts = [class_prompt(prompt, g, r, a) for a in ages for g in range(len(world.GENDERS))
               for r in range(len(world.RACES))]
    classes = np.arange(num_images) % len(prompts)
    rng = np.random.default_rng([seed, zlib.crc32(prompt.encode())])
    return world.render_prompts([prompts[j] for j in classes], rng)


def scene_truth(prompt: str) -> dict[str, str]:
    """{'subject', 'style', 'context'} a prompt asks for ('' context: none), as the world reads it."""
    spec = world.parse_prompt(prompt)
    return {"subject": spec.subject.name, "style": spec.style, "context": spec.context}
