"""Orbax checkpoints: round trip of the whole TrainState and data position, exact resumption, retention."""

import resource
import signal

import jax
import numpy as np
import pytest

from fairdiff_jax.training import checkpoints, optim, parallel


def _fresh_state(mesh):
    rs = np.random.RandomState(0)
    lora = {"text_encoder": {"layers_0": {"q_proj": {"down": rs.randn(8, 2).astype(np.float32),
                                                      "up": np.zeros((2, 8), np.float32)}}}}
    return parallel.replicate(optim.create_train_state(lora, optim.make_optimizer(1e-2), 0.996, seed=5991), mesh)


@jax.jit
def _step(state):
    """A stand-in training step whose gradient depends on the state's RNG and step, as the real one does."""
    key = jax.random.fold_in(state.rng, state.step)
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(key, len(leaves))
    grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return optim.apply_gradients(state, grads)[0]


def _run(state, steps):
    for _ in range(steps):
        state = _step(state)
    return state


def _assert_states_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_resume_reproduce_the_run(tmp_path):
    mesh = parallel.make_mesh()
    position = {"epoch": 2, "index_in_epoch": 17, "shuffle_seed": 5992}
    straight = _run(_fresh_state(mesh), 6)

    state = _run(_fresh_state(mesh), 4)
    with checkpoints.Checkpointer(tmp_path, every_steps=2) as checkpointer:
        assert checkpointer.save(state, position)
    # A new process would build the initial state the same way and restore into it.
    template = _fresh_state(mesh)
    restored, restored_position = checkpoints.restore_latest(tmp_path, checkpoints.abstract_like(template))
    assert restored_position == position
    assert isinstance(restored, optim.TrainState) and restored.tx is template.tx
    _assert_states_equal(restored, state)  # every leaf: step, LoRA, Adam moments + count, EMA, k, RNG
    assert int(restored.step) == 4 and int(restored.ema_count) == 4
    np.testing.assert_array_equal(restored.rng, jax.random.key_data(jax.random.key(5991)))
    assert restored.params["text_encoder"]["layers_0"]["q_proj"]["up"].sharding.is_fully_replicated
    _assert_states_equal(_run(restored, 2), straight)


def test_restore_target_from_eval_shape(tmp_path):
    mesh = parallel.make_mesh()
    state = _run(_fresh_state(mesh), 2)
    with checkpoints.Checkpointer(tmp_path, every_steps=1) as checkpointer:
        checkpointer.save(state, {"epoch": 0, "index_in_epoch": 2})
    shapes = jax.eval_shape(lambda: _fresh_state(mesh))
    restored, _ = checkpoints.restore_latest(tmp_path, checkpoints.abstract_like(shapes, parallel.replicated(mesh)))
    _assert_states_equal(restored, state)


def test_temporary_and_permanent_retention(tmp_path):
    mesh = parallel.make_mesh()
    state = _fresh_state(mesh)
    saved_at = []
    with checkpoints.Checkpointer(tmp_path, every_steps=2, keep=2, permanent_every_steps=6) as checkpointer:
        for _ in range(13):
            state = _step(state)
            if checkpointer.save(state, {"epoch": 0, "index_in_epoch": int(state.step)}):
                saved_at.append(int(state.step))
        checkpointer.wait()
        assert saved_at == [2, 4, 6, 8, 10, 12]
        # newest 2 temporaries {10, 12} + permanents {6, 12}
        assert checkpointer.all_steps() == [6, 10, 12]
        position = {"epoch": 0, "index_in_epoch": 13}
        assert checkpointer.save(state, position, force=True)  # e.g. the last step
        assert not checkpointer.save(state, position, force=True)  # already saved: a no-op, not an error
        checkpointer.wait()
        assert checkpointer.all_steps() == [6, 12, 13]
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [6, 12, 13]


def test_no_checkpoint_and_unfinished_checkpoint_are_ignored(tmp_path):
    mesh = parallel.make_mesh()
    template = checkpoints.abstract_like(_fresh_state(mesh))
    assert checkpoints.restore_latest(tmp_path / "missing", template) is None
    assert checkpoints.restore_latest(tmp_path, template) is None
    state = _run(_fresh_state(mesh), 2)
    with checkpoints.Checkpointer(tmp_path, every_steps=2) as checkpointer:
        checkpointer.save(state, {"epoch": 0, "index_in_epoch": 2})
    # What a crash in the middle of writing step 4 leaves behind: orbax's temporary directory.
    (tmp_path / "4.orbax-checkpoint-tmp-1234").mkdir()
    (tmp_path / "4.orbax-checkpoint-tmp-1234" / "junk").write_text("half written")
    restored, position = checkpoints.restore_latest(tmp_path, template)
    assert int(restored.step) == 2 and position["index_in_epoch"] == 2


def test_async_save_is_complete_after_close(tmp_path):
    mesh = parallel.make_mesh()
    state = _run(_fresh_state(mesh), 2)
    checkpointer = checkpoints.Checkpointer(tmp_path, every_steps=2, async_save=True)
    checkpointer.save(state, {"epoch": 0, "index_in_epoch": 2})
    state = _step(state)  # training goes on while the files are written
    checkpointer.close()
    assert checkpoints.Checkpointer(tmp_path).all_steps() == [2]
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def _damage(step_dir, how):
    if how == "deleted manifest":
        (step_dir / "state" / "manifest.ocdbt").unlink()
    elif how == "corrupt state data":
        for data_file in (step_dir / "state").rglob("d/*"):
            raw = bytearray(data_file.read_bytes())
            raw[len(raw) // 2:] = bytes(len(raw) - len(raw) // 2)
            data_file.write_bytes(bytes(raw))
    elif how == "truncated position":
        path = step_dir / "data" / "metadata"
        path.write_text(path.read_text()[:3])


@pytest.mark.parametrize("how", ["deleted manifest", "corrupt state data", "truncated position"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys, how):
    mesh = parallel.make_mesh()
    states = {}
    with checkpoints.Checkpointer(tmp_path / "ck", every_steps=2) as checkpointer:
        state = _fresh_state(mesh)
        for step in (2, 4):
            state = _run(state, 2)
            states[step] = state
            checkpointer.save(state, {"step": step})
    _damage(tmp_path / "ck" / "4", how)
    with checkpoints.Checkpointer(tmp_path / "ck", every_steps=2) as checkpointer:
        step, restored, position = checkpointer.restore_newest_intact(checkpoints.abstract_like(_fresh_state(mesh)))
        assert (step, position) == (2, {"step": 2})
        _assert_states_equal(restored, states[2])
        assert checkpointer.all_steps() == [2]
        assert checkpointer.save(_run(restored, 2), {"step": 4})  # step 4 can be saved again
    err = capsys.readouterr().err
    assert "warning: checkpoint 4 in" in err and "cannot be read" in err
    assert (tmp_path / "ck_damaged" / "4").is_dir()


def test_no_intact_checkpoint_is_an_error_naming_each_cause(tmp_path):
    mesh = parallel.make_mesh()
    with checkpoints.Checkpointer(tmp_path / "ck", every_steps=2) as checkpointer:
        checkpointer.save(_run(_fresh_state(mesh), 2), {})
    _damage(tmp_path / "ck" / "2", "deleted manifest")
    with checkpoints.Checkpointer(tmp_path / "ck", every_steps=2) as checkpointer:
        with pytest.raises(checkpoints.CheckpointError, match=r"no checkpoint .* can be restored \(step 2: "):
            checkpointer.restore_newest_intact(checkpoints.abstract_like(_fresh_state(mesh)))
    assert (tmp_path / "ck" / "2").is_dir()  # nothing moved


def test_a_failed_background_save_stops_the_run_with_its_cause(tmp_path):
    # A file-size limit makes the checkpoint's data file fail to write (EFBIG), as a full disk does (ENOSPC).
    mesh = parallel.make_mesh()
    lora = {"unet": {"l": {"q": {"down": np.random.RandomState(0).randn(512, 512).astype(np.float32),
                                 "up": np.zeros((2, 512), np.float32)}}}}
    state = parallel.replicate(optim.create_train_state(lora, optim.make_optimizer(1e-2), 0.996, seed=1), mesh)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    checkpointer = checkpoints.Checkpointer(tmp_path / "ck", every_steps=1)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(checkpoints.CheckpointError, match=r"failed: .*File too large") as error:
            with checkpointer:
                for _ in range(3):
                    state = state.replace(step=state.step + 1)
                    checkpointer.save(state, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert str(error.value).count("\n") == 0
