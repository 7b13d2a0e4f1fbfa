"""The miniature world's ground truth for evaluation: reference renders of a prompt with every gender x race
class equally represented (the fidelity metric's reference set: a debiased model that draws a balanced
population of the prompt's scene must not be penalised for its attributes), and the scene a prompt asks for
(the consistency judge's truth).

    renders = balanced_renders("a photo of the face of a judge, a person", 64, seed=0)   # 8 of each class
    scene_truth("a watercolor painting of the face of a judge at night")
    # {'subject': 'judge', 'style': 'watercolor painting', 'context': 'at night'}
"""

import zlib

import numpy as np

from fairdiff_jax.miniature import drawing, world


def class_prompt(prompt: str, gender: int, race: int) -> str:
    """`prompt` with attribute words that fix gender and race (the world reads them anywhere in a prompt);
    ValueError naming the prompt when it already fixes either, or when the words would change its scene."""
    spec = world.parse_prompt(prompt)
    if spec.gender is not None or spec.race is not None:
        raise ValueError(f"prompt {prompt!r} fixes gender or race: it has no balanced reference")
    fixed = f"{prompt}, {world.GENDERS[gender]} {world.RACES[race]}"
    fixed_spec = world.parse_prompt(fixed)
    if (fixed_spec.subject.name, fixed_spec.style, fixed_spec.context, fixed_spec.gender, fixed_spec.race) != (
            spec.subject.name, spec.style, spec.context, gender, race):
        raise ValueError(f"prompt {prompt!r}: attribute words change how the world reads it ({fixed!r})")
    return fixed


def balanced_renders(prompt: str, num_images: int, seed: int = 0) -> drawing.Renders:
    """num_images renders of `prompt`'s scene, image i of gender x race class i mod 8 (j = 4 g + r), so every class
    has the same count when num_images is a multiple of 8. Deterministic in (prompt, num_images, seed)."""
    classes = np.arange(num_images) % world.NUM_JOINT
    prompts = [class_prompt(prompt, j // len(world.RACES), j % len(world.RACES)) for j in range(world.NUM_JOINT)]
    rng = np.random.default_rng([seed, zlib.crc32(prompt.encode())])
    return world.render_prompts([prompts[j] for j in classes], rng)


def scene_truth(prompt: str) -> dict[str, str]:
    """{'subject', 'style', 'context'} a prompt asks for ('' context: none), as the world reads it."""
    spec = world.parse_prompt(prompt)
    return {"subject": spec.subject.name, "style": spec.style, "context": spec.context}
