"""Tables of the evaluation's per-prompt rows (`evaluator.prompt_metrics`): mean +- std over prompts as the paper's
tables report them, Markdown (one set, per prompt, before -> after), CSV.

Metric keys are the same in training logs, evaluation tables and TensorBoard; `METRIC_LABELS` says how the
tables name them. Bias (docs/method.md, "Metrics") = mean over class pairs of |freq_i - freq_j| of the argmax
predictions of the images with a face.
"""

import csv
import io
import itertools
import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from fairdiff_jax import attributes
from fairdiff_jax.eval import bias as bias_lib
from fairdiff_jax.eval.folders import write_atomic


def _bias_metric_labels() -> dict[str, str]:
    """{'<a>_bias': '<a> bias', '<a>_<b>_bias': '<a> x <b> bias', ...} for every combination of the known attributes
    (fairdiff_jax/attributes.py), singles first, in attribute order: gender, race, age, gender x race, ..."""
    names = list(attributes.ATTRIBUTES)
    combos = [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]
    return {"_".join(c) + "_bias": " x ".join(c) + " bias" for c in combos}


def bias_num_classes(name: str) -> int:
    """Classes a bias metric is measured over: 'gender_race_bias' -> 2 x 4 = 8."""
    return math.prod(attributes.get(a).num_classes for a in name.removesuffix("_bias").split("_"))


# Per-prompt metrics, in table order, and how the tables name them.
BIAS_LABELS = _bias_metric_labels()
METRIC_LABELS = {
    "face_share": "face share",
    "degenerate_share": "degenerate",
    **BIAS_LABELS,
    "old_share": "old share",
    "fidelity_precision": "fidelity precision",
    "fidelity_recall": "fidelity recall",
    "consistency": "consistency",
    "clip_i": "CLIP-I",
    "dino": "DINO",
}
BIAS_METRICS = tuple(BIAS_LABELS)  # every bias a table can show; a table shows those its rows have
# What a before -> after table shows: the bias, then what tells a kept picture from a destroyed one.
COMPARISON_METRICS = (*BIAS_METRICS, "fidelity_precision", "fidelity_recall", "consistency", "face_share", "clip_i", "dino")


class MeanStd(NamedTuple):
    mean: float
    std: float
    num_prompts: int  # prompts with a defined value


def label(name: str, consistency_name: Optional[str] = None) -> str:
    """The table label of metric `name`; consistency names its judge (e.g. 'consistency (CLIP-T)')."""
    if name == "consistency" and consistency_name:
        return f"consistency ({consistency_name})"
    return METRIC_LABELS[name]


PromptTexts = Optional[Sequence[str] | Mapping[int, str]]  # the prompt of each prompt_i folder, by i


def prompt_text(prompt_texts: PromptTexts, i: int) -> Optional[str]:
    """The text of prompt i, None when unknown."""
    if prompt_texts is None:
        return None
    known = i in prompt_texts if isinstance(prompt_texts, Mapping) else i < len(prompt_texts)
    return prompt_texts[i] if known else None


def per_prompt_table(rows_by_prompt: Mapping[int, Mapping[str, float]], prompt_texts: PromptTexts = None) -> list[dict[str, Any]]:
    """{prompt index: metrics row} -> [{prompt_index, prompt, **row}] in prompt order; prompt '' when unknown."""
    return [{"prompt_index": i, "prompt": prompt_text(prompt_texts, i) or "", **row} for i, row in rows_by_prompt.items()]


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, MeanStd]:
    """{metric: MeanStd over prompts} for the METRIC_LABELS metrics the rows have; NaN values (prompts
    without a face) are skipped; population std (`bias_lib.mean_std_over_prompts`)."""
    summary = {}
    for name in METRIC_LABELS:
        if rows and name in rows[0]:
            values = np.array([row[name] for row in rows], np.float64)
            mean, std = bias_lib.mean_std_over_prompts(values)
            summary[name] = MeanStd(mean, std, int((~np.isnan(values)).sum()))
    return summary


def _format(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def _format_mean_std(stat: Optional[MeanStd]) -> str:
    if stat is None or math.isnan(stat.mean):
        return "–"
    return f"{stat.mean:.3f} ± {stat.std:.3f}"


def warnings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines that say what a table's numbers must not hide: unreadable and degenerate images, prompts with no face."""
    out = []
    unreadable = sum(r.get("num_unreadable", 0) for r in rows)
    if unreadable:
        out.append(f"WARNING: {unreadable} image files could not be read and were skipped (not counted in the images)")
    degenerate = sum(round(r["degenerate_share"] * r["num_images"]) for r in rows if "degenerate_share" in r)
    if degenerate:
        total = sum(r["num_images"] for r in rows)
        out.append(f"WARNING: {degenerate} of {total} images are degenerate (not finite, or of one colour): "
                   "they count as images without a face")
    faceless = [r["prompt"] or f"prompt_{r['prompt_index']}" for r in rows if r["num_faces"] == 0]
    if faceless:
        out.append(f"WARNING: no face in any image of {faceless}: their bias is undefined (–)")
    return out


def summary_markdown(summary: Mapping[str, MeanStd], title: str = "Summary over prompts",
                     consistency_name: Optional[str] = None, notes: Sequence[str] = ()) -> str:
    """A Markdown table: metric | mean ± std | prompts (and the `notes` below it)."""
    lines = [f"### {title}", "", "| metric | mean ± std | prompts |", "|---|---|---|"]
    lines += [f"| {label(name, consistency_name)} | {_format_mean_std(stat)} | {stat.num_prompts} |"
              for name, stat in summary.items()]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def per_prompt_markdown(rows: Sequence[Mapping[str, Any]], consistency_name: Optional[str] = None) -> str:
    """A Markdown table with one line per prompt."""
    names = [name for name in METRIC_LABELS if rows and name in rows[0]]
    lines = ["| # | prompt | images | faces | " + " | ".join(label(n, consistency_name) for n in names) + " |",
             "|---" * (4 + len(names)) + "|"]
    for row in rows:
        images = str(row["num_images"]) + (f" (+{row['num_unreadable']} unreadable)" if row.get("num_unreadable") else "")
        cells = [str(row["prompt_index"]), row["prompt"].replace("|", "\\|"), images, str(row["num_faces"])]
        lines.append("| " + " | ".join(cells + [_format(row[n]) for n in names]) + " |")
    return "\n".join(lines) + "\n"


def comparison_markdown(
    summaries: Mapping[str, tuple[Mapping[str, MeanStd], Mapping[str, MeanStd]]],
    labels: tuple[str, str] = ("original", "debiased"),
    metric_names: Sequence[str] = COMPARISON_METRICS,
    consistency_name: Optional[str] = None,
) -> str:
    """Before/after table, one line per prompt set: {set name: (before summary, after summary)}.

    Cells read 'before → after' (mean ± std over prompts); a metric only one side has (CLIP-I, DINO: the
    debiased images' similarity to the original's; fidelity against the original's images) shows that side
    alone. Metrics no summary has are left out.
    """
    shown = [n for n in metric_names if any(n in s for pair in summaries.values() for s in pair)]
    lines = [f"{labels[0]} → {labels[1]} (mean ± std over prompts)", "",
             "| prompts | " + " | ".join(label(n, consistency_name) for n in shown) + " |", "|---" * (1 + len(shown)) + "|"]
    for set_name, (before, after) in summaries.items():
        cells = []
        for n in shown:
            if n in before and n in after:
                cells.append(f"{_format_mean_std(before[n])} → {_format_mean_std(after[n])}")
            else:
                cells.append(_format_mean_std(before.get(n) or after.get(n)))
        lines.append(f"| {set_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """rows (dicts with the same keys) as CSV, floats with 6 decimals; written atomically."""
    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows])
        text.flush()
        text.detach()

    write_atomic(path, write)
