"""The training workdir: one run at a time (lock), metrics de-duplicated on resume, a changed config refused."""

import json
import socket
import subprocess
import sys

import pytest

from fairdiff_jax.training import workdir


def test_a_second_run_is_refused_naming_the_first(tmp_path):
    with workdir.WorkdirLock(tmp_path):
        lock = json.loads((tmp_path / workdir.LOCK_NAME).read_text())
        with pytest.raises(workdir.WorkdirBusyError) as error:
            workdir.WorkdirLock(tmp_path).acquire()
        message = str(error.value)
        assert f"process {lock['pid']} on host {socket.gethostname()}" in message and "train.lock" in message
    assert not (tmp_path / workdir.LOCK_NAME).exists()  # released on exit


def test_a_dead_processes_lock_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / workdir.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    with workdir.WorkdirLock(tmp_path) as lock:
        assert json.loads((tmp_path / workdir.LOCK_NAME).read_text())["pid"] == lock.content["pid"]
    assert f"left by process {dead.pid}, which is gone" in capsys.readouterr().err


def test_another_hosts_lock_is_never_taken_over(tmp_path):
    (tmp_path / workdir.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(workdir.WorkdirBusyError, match="process 1 on host elsewhere"):
        workdir.WorkdirLock(tmp_path).acquire()


def _line(step, kind="train"):
    return json.dumps({"step": step, "kind": kind, "loss": 0.1 * step})


def test_metrics_after_the_resumed_checkpoint_are_dropped(tmp_path):
    # A run checkpointed at step 2, logged steps 3 and 4 and the evaluation at step 2, then was killed mid-line.
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([_line(0, "eval"), _line(1), _line(2), _line(2, "eval"), _line(3), _line(4)]) + '\n{"st')
    workdir.trim_metrics(path, 2)
    kept = [(r["step"], r["kind"]) for r in map(json.loads, path.read_text().splitlines())]
    assert kept == [(0, "eval"), (1, "train"), (2, "train")]
    workdir.trim_metrics(path, 0)
    assert path.read_text() == ""


def _config(**train):
    return json.dumps({"workdir": "w", "train": {"max_steps": 4, "micro_batch_size": 2, **train}, "seed": 0})


def test_resume_refuses_a_changed_config_unless_allowed(tmp_path, capsys):
    (tmp_path / "config.json").write_text(_config())
    workdir.check_resumed_config(tmp_path, _config(max_steps=8), allow_change=False)  # a longer run is a resume
    with pytest.raises(workdir.ConfigChangedError, match=r"train.micro_batch_size: 2 -> 1.*--allow_config_change"):
        workdir.check_resumed_config(tmp_path, _config(micro_batch_size=1), allow_change=False)
    workdir.check_resumed_config(tmp_path, _config(micro_batch_size=1), allow_change=True)
    assert json.loads((tmp_path / "config.previous.json").read_text())["train"]["micro_batch_size"] == 2
    assert "resuming with a changed config (train.micro_batch_size: 2 -> 1)" in capsys.readouterr().err


def test_resume_refuses_a_change_of_what_the_checkpoints_hold_even_when_allowed(tmp_path):
    config = lambda **optim: json.dumps({"workdir": "w", "lora": {"rank": 8}, "optim": {"decay_steps": 0, **optim}})  # noqa: E731
    (tmp_path / "config.json").write_text(config())
    with pytest.raises(workdir.ConfigChangedError, match=r"optim.decay_steps: 0 -> 96.*new --workdir"):
        workdir.check_resumed_config(tmp_path, config(decay_steps=96), allow_change=True)
    (tmp_path / "config.json").write_text(config(decay_steps=96))
    workdir.check_resumed_config(tmp_path, config(decay_steps=192), allow_change=True)  # a longer schedule: same state
    (tmp_path / "config.json").write_text(config())
    with pytest.raises(workdir.ConfigChangedError, match=r"lora.rank: 8 -> 4"):
        workdir.check_resumed_config(tmp_path, json.dumps({"workdir": "w", "lora": {"rank": 4}}), allow_change=True)
