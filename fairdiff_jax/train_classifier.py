"""Trains a face-attribute classifier in JAX and exports it for the debiasing configs.

    python -m fairdiff_jax.train_classifier --config configs/classifier_miniature.py [--config.<key>=<value>]

See fairdiff_jax/classifier/trainer.py for what it does and writes, configs/classifier_*.py for the runs.
"""

import sys
from typing import Sequence

from fairdiff_jax import config_cli


def main(argv: Sequence[str]) -> int:
    try:
        config, _ = config_cli.parse_config_args(argv)
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
