"""The training run's folder kept consistent: one run at a time, one metrics line per step, one config per run.

    with WorkdirLock(workdir):                          # WorkdirBusyError names the other run's pid and host
        check_resumed_config(workdir, config, allow_change=False)   # ConfigChangedError lists the changed keys
        trim_metrics(workdir / "metrics.jsonl", start_step)         # drops lines the resumed run writes again

Two runs in one workdir delete each other's temporary checkpoints and interleave their metrics; a resumed run
re-logs the steps after its checkpoint (they were lost with the process); a resumed run with other config values
is a different experiment under the old run's name. These helpers stop or repair each case before training starts.
"""

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Mapping

LOCK_NAME = "train.lock"
# Keys a resumed run may change without --allow_config_change: where the run lives and how long it goes on.
RESUMABLE_KEYS = ("workdir", "train.max_steps")
# What the checkpointed train state's tree is made of: a run saved with one value cannot restore as another, even
# with --allow_config_change. Each key maps to the part of its value that matters: for optim.decay_steps only
# whether it is 0, since a learning-rate schedule adds a count to AdamW's state.
STATE_SHAPING_KEYS = {"lora.rank": lambda v: v, "lora.train_text_encoder": lambda v: v,
                      "lora.train_unet": lambda v: v, "optim.decay_steps": bool}


class WorkdirBusyError(RuntimeError):
    """Another process holds the workdir's lock; the message names it."""


class ConfigChangedError(ValueError):
    """--resume with config values that differ from the run's config.json; the message lists them."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class WorkdirLock:
    """workdir/train.lock, created exclusively, holding {"pid", "host", "started"}; removed on exit. A lock left by
    a dead process of this host is taken over with a warning; any other lock is refused."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK_NAME
        self.content = {"pid": os.getpid(), "host": socket.gethostname(),
                        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.content, f)
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._create():
            return
        try:
            other = json.loads(self.path.read_text())
            pid, host, started = int(other["pid"]), str(other["host"]), other.get("started", "?")
        except (OSError, ValueError, KeyError, TypeError):
            pid, host, started = None, None, "?"
        if host == self.content["host"] and pid is not None and not _process_alive(pid):
            print(f"warning: {self.path} was left by process {pid}, which is gone: taking it over", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            if self._create():
                return
            raise WorkdirBusyError(f"{self.path.parent} was locked by another run while taking over {self.path}")
        who = f"process {pid} on host {host}, started {started}" if pid is not None else "an unreadable lock file"
        raise WorkdirBusyError(f"{self.path.parent} is in use by {who} ({self.path}); wait for it or stop it, or "
                               "delete the lock file if that run is dead")

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == self.content["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumed_config(workdir: Path, config_json: str, allow_change: bool) -> None:
    """Compares a resumed run's config (JSON text, as config.json holds it) with workdir/config.json. Raises
    ConfigChangedError listing every changed key outside RESUMABLE_KEYS unless `allow_change`; with it, the old
    file is kept as config.previous.json beside the new one. A change of STATE_SHAPING_KEYS is refused always."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return
    try:
        before = _flatten(json.loads(path.read_text()))
    except ValueError as e:
        raise ConfigChangedError(f"{path} is unreadable ({e}): cannot tell whether --resume changes the config") from e
    now = _flatten(json.loads(config_json))
    reshaped = [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key, shape in STATE_SHAPING_KEYS.items()
                if shape(before.get(key)) != shape(now.get(key))]
    if reshaped:
        raise ConfigChangedError(f"--resume cannot change what {path.parent}'s checkpoints are made of "
                                 f"({'; '.join(reshaped)}): start a new --workdir")
    changed = [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
               if key not in RESUMABLE_KEYS and before.get(key) != now.get(key)]
    if not changed:
        return
    if not allow_change:
        raise ConfigChangedError(f"--resume with a config that differs from {path} ({'; '.join(changed)}): "
                                 "pass the run's values, or --allow_config_change to continue with the new ones")
    print(f"warning: resuming with a changed config ({'; '.join(changed)}); the old one is kept as "
          f"{path.with_name('config.previous.json')}", file=sys.stderr)
    os.replace(path, path.with_name("config.previous.json"))


def trim_metrics(path: Path, start_step: int) -> None:
    """Keeps the metrics lines of a run restarted at `start_step`: train lines of steps <= start_step and eval
    lines of steps < start_step (the restarted run logs the rest again); drops a torn last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            step, kind = int(record["step"]), record["kind"]
        except (ValueError, KeyError, TypeError):
            continue
        if step < start_step or (step == start_step and kind != "eval"):
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
