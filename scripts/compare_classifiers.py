"""Held-out accuracy of a JAX-trained face-attribute classifier beside the miniature world's shipped
torch-trained ones, on the same face chips (the TFDS splits the trainer evaluates on).

    python scripts/compare_classifiers.py --config configs/classifier_miniature.py [--workdir DIR]

Reads <workdir>/export/classifier.pt (heads: config.model.heads; workdir: config.workdir unless given), the
shipped assets/miniature/classifier.pt (gender + race, the loss's) and test_classifiers/{gender,race,age}.pt
(the evaluation's: one torch network trained with the three heads, as the JAX one is, saved per head), and
prints per split and head the accuracy of each, with the shipped build's own figures (manifest.json:
classifier_accuracy, chips cut around the true boxes) for reference.
"""

import argparse
import json
from pathlib import Path


from fairdiff_jax import attributes, config_cli
from fairdiff_jax.classifier import pipeline, trainer
from fairdiff_jax.judging.mobilenet_v3 import load_mobilenet_v3
from fairdiff_jax.training import parallel


def accuracies(path: Path, heads, builder, splits, batch_size: int, mesh) -> dict:
    module, variables = load_mobilenet_v3(path, sum(k for _, k in heads))
    _, eval_step = trainer.make_steps(module, heads, use_augmentation=False)
    variables = parallel.replicate(variables, mesh)
    return {split: trainer.evaluate(eval_step, variables, builder, split, heads, batch_size, mesh) for split in splits}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/classifier_miniature.py")
    parser.add_argument("--workdir", type=Path, help="the classifier run's folder (default: config.workdir)")
    parser.add_argument("--assets", type=Path, default=Path("assets/miniature"))
    args = parser.parse_args(argv)
    config = config_cli.load_config(args.config)
    workdir = args.workdir or Path(config.workdir)
    heads = tuple((str(n), int(k)) for n, k in config.model.heads)
    mesh = parallel.make_mesh()
    builder = pipeline.make_builder(config.data)
    splits = tuple(config.data.eval_splits)
    rows = {
        "jax-trained": accuracies(workdir / "export" / "classifier.pt", heads, builder, splits,
                                  config.eval_batch_size, mesh),
        "shipped classifier.pt": accuracies(args.assets / "classifier.pt", attributes.GENDER_RACE_HEADS, builder,
                                            splits, config.eval_batch_size, mesh),
    }
    for attribute in attributes.ATTRIBUTES.values():
        rows[f"shipped test_classifiers/{attribute.name}.pt"] = accuracies(
            args.assets / "test_classifiers" / f"{attribute.name}.pt", ((attribute.name, attribute.num_classes),),
            builder, splits, config.eval_batch_size, mesh)
    print(f"{'classifier':34s} {'split':14s} " + " ".join(f"{n:>8s}" for n, _ in heads))
    for name, by_split in rows.items():
        for split, values in by_split.items():
            cells = [values.get(f"{head}_accuracy") for head, _ in heads]
            print(f"{name:34s} {split:14s} " + " ".join(f"{c:8.4f}" if c is not None else f"{'-':>8s}" for c in cells))
    manifest = json.loads((args.assets / "manifest.json").read_text())
    print(f"shipped build's manifest (true boxes + jitter): {manifest['classifier_accuracy']}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
