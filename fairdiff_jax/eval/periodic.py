"""Training's periodic evaluation: the validation prompts' images of each weight set (current, EMA), measured by
the same evaluator as `python -m fairdiff_jax.before_after` (eval/from_config.py), logged under the same names.

    evaluation = PeriodicEvaluation(config, stages, frozen)     # loads the evaluation's judges once
    evaluation.run(step, {"current": lora, "ema": ema_lora}, val_prompts, workdir, writer)

Per weight set and prompt: config.eval.images_per_prompt images with eval.num_denoising_steps from noises fixed
for the whole run; `evaluator.prompt_metrics` against the prompt's fidelity reference (the original model's
images of the same noises, generated once, or the miniature world's balanced renders); the means over prompts
and every prompt's row go to the writer as `<weights>/<metric>` and `<weights>/prompt_<i>/<metric>`, annotated
grids to workdir/eval/step_<N>/<weights>/prompt_<i>.jpg.
"""

from pathlib import Path

import jax
import numpy as np

from fairdiff_jax import attributes as attributes_lib
from fairdiff_jax.eval import bias as bias_lib
from fairdiff_jax.eval import from_config
from fairdiff_jax.eval import grids as grids_lib
from fairdiff_jax.eval.evaluator import PromptResults, prompt_metrics
from fairdiff_jax.sd import sampler
from fairdiff_jax.training import parallel

EVAL_KEY_INDEX = 2**31 - 1  # the noises' key: fold_in(seed key, this); training steps never reach this index


class PeriodicEvaluation:
    """The evaluator of `config.eval` and the generation stages of a training run."""

    def __init__(self, config, stages, frozen):
        self.config, self.stages, self.frozen = config, stages, frozen
        self.evaluator = from_config.load_evaluator(config)
        self.schedule = parallel.replicate(sampler.make_schedule(stages.sd.scheduler_config, config.eval.num_denoising_steps),
                                           stages.mesh)
        self.key = jax.random.fold_in(jax.random.key(config.seed), EVAL_KEY_INDEX)
        self._references: dict[int, np.ndarray] = {}  # prompt index -> reference features (fixed for the run)

    def images(self, lora: dict, prompt_index: int, prompt: str) -> np.ndarray:
        """[eval.images_per_prompt, H, W, 3] in [-1, 1] of `lora` ({}: the original model), on every host."""
        e = self.config.eval
        noise = self.stages.noise(jax.random.fold_in(self.key, prompt_index), e.images_per_prompt)
        images = self.stages.generate(lora, self.frozen, self.stages.tokenize(prompt), self.schedule, noise, e.batch_size)
        return np.asarray(parallel.gather_to_hosts(images))

    def reference_features(self, prompt_index: int, prompt: str) -> np.ndarray:
        if prompt_index not in self._references:
            e = self.config.eval
            if e.fidelity_reference == "miniature_world":
                features = from_config.world_reference_features(self.evaluator, prompt, e.reference_images_per_prompt,
                                                                self.config.seed)
            else:
                features = self.evaluator.features(self.images({}, prompt_index, prompt))
            self._references[prompt_index] = features
        return self._references[prompt_index]

    def run(self, step: int, weight_sets: dict, val_prompts: list[str], workdir: Path, writer) -> None:
        evaluator = self.evaluator
        colors = attributes_lib.colors(evaluator.bias_attributes)
        for name, lora in weight_sets.items():
            rows = []
            for i, prompt in enumerate(val_prompts):
                images = self.images(lora, i, prompt)
                result = PromptResults.from_rows([str(j) for j in range(len(images))], evaluator.judge(images, prompt))
                row = prompt_metrics(result, self.reference_features(i, prompt), evaluator.fidelity_k,
                                     evaluator.confidence_level, evaluator.bias_attributes)
                rows.append({k: float(v) for k, v in row.items()})
                if jax.process_index() == 0:
                    probs = [result.probs(a) for a in evaluator.bias_attributes]
                    grid = grids_lib.annotated_grid(images, result.found, result.boxes, probs, colors)
                    grids_lib.save_image(grid, workdir / "eval" / f"step_{step}" / name / f"prompt_{i}.jpg")
                    writer.write_image(step, f"eval/{name}/prompt_{i}", grid)
            summary = bias_lib.summarize_over_prompts(rows)
            scalars = {f"{name}/{k}": mean for k, (mean, _) in summary.items()}
            scalars.update({f"{name}/prompt_{i}/{k}": v for i, row in enumerate(rows) for k, v in row.items()})
            writer.write(step, "eval", scalars)
