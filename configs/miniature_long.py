"""The miniature world's longer documented run: configs/miniature.py's debiasing over 384 steps, with the learning
rate falling along a half cosine from 5e-3 to 0 (optim.decay_steps). The demo's 32 constant steps fit in minutes;
this run removes more of every gap and keeps the pictures (README.md, "Measured with the evaluation judges":
35% / 40% / 33% of the gender / race / gender x race gaps removed on the held-out prompts, fidelity precision 0.92x,
consistency 0.96x, face share 1.00x; the issue's targets 60% / 50% / 60% are not reached). About 48 min of training
on 2 quiet cores.

Run (from the repository root), then export and before_after as for configs/miniature.py:
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python -m fairdiff_jax.train --config configs/miniature_long.py --workdir workdirs/miniature_long
"""

from configs import miniature


def get_config():
    config = miniature.get_config()
    config.name = "miniature_long"
    config.train.max_steps = 384
    # Over the whole run: the same summed learning rate in 2x the steps at a falling rate costs the pictures far
    # less than constant steps (measured: README.md).
    config.optim.decay_steps = config.train.max_steps
    config.eval.every_steps = 128  # a look at steps 128, 256 and 384 (validation prompts); before_after measures
    config.ckpt.permanent_every_steps = 128
    return config
