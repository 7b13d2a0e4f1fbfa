"""Experiment configs from the command line: `--config configs/<name>.py` plus `--config.<key>=<value>`.

A config file is a Python file whose `get_config()` returns an `ml_collections.ConfigDict` (see
configs/). Overrides follow ml_collections' config_flags (absl flags): `--config.optim.learning_rate=1e-4`,
`--config.lora.train_unet=true`, `--config.target.attributes='("gender",)'`; values are parsed to the
type of the key they replace. Keys are checked against the loaded file before anything else runs: an
unknown key stops the program with a message naming it and the keys that do exist there.

Run from the repository root (config files import `configs.common`). To see the resolved config:
    python -m fairdiff_jax.config_cli --config configs/debias_text_encoder.py --config.optim.learning_rate=1e-4
"""

import sys
from typing import Optional, Sequence

from absl import flags
from ml_collections import config_dict, config_flags

_FLAG = "config"


class ConfigError(ValueError):
    """A bad --config / --config.<key> argument; the message names it."""


def _parse(argv: list[str]) -> tuple[config_dict.ConfigDict, list[str]]:
    # A fresh FlagValues per call: nothing global is defined, so tests and tools can parse repeatedly.
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        _FLAG, None, "experiment config file (configs/*.py)", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    try:
        positional = flag_values(argv)
    except (flags.Error, AttributeError, KeyError, TypeError) as e:
        raise ConfigError(str(e)) from e
    config = flag_values[_FLAG].value
    if config is None:
        raise ConfigError("no config file given: pass --config configs/<name>.py")
    if not isinstance(config, config_dict.ConfigDict):
        try:
            config.to_dict()  # config_flags' stand-in for a file that failed to load raises its error here
        except Exception as e:
            raise ConfigError(str(e)) from e
    return config, positional[1:]


def _option_name(arg: str) -> Optional[str]:
    """'--config.a.b=1' -> 'config.a.b'; None for positional arguments."""
    if not arg.startswith("-"):
        return None
    return arg.lstrip("-").split("=", 1)[0]


def _config_file_args(argv: Sequence[str]) -> list[str]:
    """The --config argument(s) alone, `--config=path` or `--config path`."""
    for i, arg in enumerate(argv):
        if _option_name(arg) == _FLAG:
            return [arg] if "=" in arg else list(argv[i : i + 2])
    return []


def _check_override_keys(argv: Sequence[str], config: config_dict.ConfigDict) -> None:
    for arg in argv:
        name = _option_name(arg)
        if name is None or not name.startswith(_FLAG + "."):
            continue
        key = name[len(_FLAG) + 1 :]
        node, walked = config, []
        for part in key.split("."):
            if not isinstance(node, config_dict.ConfigDict) or part not in node:
                where = ".".join(walked) or "the top level"
                known = ", ".join(sorted(node.keys())) if isinstance(node, config_dict.ConfigDict) else "none (a value)"
                raise ConfigError(f"unknown config key {key!r} in {arg!r}: {where} has no key {part!r}; it has: {known}")
            node, walked = node[part], walked + [part]


def parse_config_args(argv: Sequence[str]) -> tuple[config_dict.ConfigDict, list[str]]:
    """`argv` as in sys.argv (argv[0] is the program) -> (locked config, positional arguments).

    Raises ConfigError for a missing/unloadable config file, an unknown key, a value of the wrong type,
    or any other unknown flag.
    """
    argv = list(argv)
    base_config, _ = _parse(argv[:1] + _config_file_args(argv))
    _check_override_keys(argv, base_config)
    return _parse(argv)


def load_config(path: str, overrides: Sequence[str] = ()) -> config_dict.ConfigDict:
    """The same from Python: load_config('configs/debias_unet.py', ['optim.learning_rate=1e-4'])."""
    config, _ = parse_config_args(["load_config", f"--{_FLAG}={path}"] + [f"--{_FLAG}.{o}" for o in overrides])
    return config


def main(argv: Sequence[str]) -> int:
    try:
        config, _ = parse_config_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
