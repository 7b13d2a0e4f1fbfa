"""Trains a face-attribute classifier in JAX and exports it for the debiasing configs.

    python -m fairdiff_jax.train_classifier --config configs/classifier_miniature.py [--workdir DIR] \
        [--config.<key>=<value>]

A rerun with the same workdir resumes from its newest checkpoint.

See fairdiff_jax/classifier/trainer.py for what it does and writes, configs/classifier_*.py for the runs.
"""

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ml_collections import config_dict

from fairdiff_jax import config_cli


def parse_args(argv: Sequence[str]) -> config_dict.ConfigDict:
    """The run's config from the command line (--workdir sets config.workdir); ConfigError names a bad argument."""
    parser = argparse.ArgumentParser(prog="python -m fairdiff_jax.train_classifier", description=__doc__,
                                     allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="run folder (default: config.workdir)")
    args, config_args = parser.parse_known_args(list(argv[1:]))
    config, positional = config_cli.parse_config_args([argv[0]] + config_args)
    if positional:
        raise config_cli.ConfigError(f"unexpected arguments: {positional}")
    if args.workdir is not None:
        if args.workdir.exists() and not args.workdir.is_dir():
            raise config_cli.ConfigError(f"--workdir {args.workdir} is a file, not a folder")
        config.workdir = str(args.workdir)
    return config


def main(argv: Sequence[str]) -> int:
    try:
        config = parse_args(argv)
    except config_cli.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from fairdiff_jax.classifier import trainer
    from fairdiff_jax.training import parallel

    parallel.initialize_distributed()
    trainer.train_and_export(config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
