"""Mesh, multi-process start-up, and the data-parallel micro-batched gradient step.

The reference everywhere is the plain single-device gradient of the batch-mean loss,
jax.grad(mean_i loss_i). Runs with 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)
and with 2 processes (jax.distributed over localhost, gloo collectives) happen in subprocesses, since
the device count is fixed when JAX starts.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fairdiff_jax.training import optim, parallel

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8


def _loss_fn(params, shared, micro_batch, rng):
    """Per-example loss of a tiny tanh regression; a 'poison' flag turns an example's loss into NaN."""
    pred = jnp.tanh(micro_batch["x"] @ params["w"] + params["b"]) * shared["scale"]
    losses = jnp.sum((pred - micro_batch["y"]) ** 2, axis=-1)
    losses = losses * jnp.where(micro_batch["poison"], jnp.nan, 1.0)  # NaN reaches the gradient too
    return losses, {"pred": pred}


def _problem(poison_index=None):
    rs = np.random.RandomState(0)
    params = {"w": rs.randn(5, 3).astype(np.float32), "b": rs.randn(3).astype(np.float32)}
    batch = {
        "x": rs.randn(BATCH, 5).astype(np.float32),
        "y": rs.randn(BATCH, 3).astype(np.float32),
        "poison": np.arange(BATCH) == poison_index,
    }
    return params, {"scale": np.float32(1.5)}, batch


def _reference(params, shared, batch):
    """(grads, per-example losses, aux) of the whole batch on one device, no micro-batching."""

    def mean_loss(p):
        losses, aux = _loss_fn(p, shared, batch, None)
        return jnp.mean(losses), (losses, aux)

    grads, (losses, aux) = jax.grad(mean_loss, has_aux=True)(params)
    return grads, losses, aux


def _assert_trees_close(actual, expected, atol=1e-6):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=atol)


def _grads_on(mesh, micro_batch_size, params, shared, batch):
    grad_fn = jax.jit(parallel.make_grad_fn(_loss_fn, mesh, micro_batch_size))
    return grad_fn(
        parallel.replicate(params, mesh), parallel.replicate(shared, mesh), parallel.shard_batch(batch, mesh),
        jax.random.key(0),
    )


def _train_two_steps(mesh, micro_batch_size):
    params, shared, batch = _problem()
    state = parallel.replicate(optim.create_train_state(params, optim.make_optimizer(1e-2), 0.996, seed=3), mesh)
    train_step = parallel.make_train_step(_loss_fn, mesh, micro_batch_size)
    shared, batch = parallel.replicate(shared, mesh), parallel.shard_batch(batch, mesh)
    for step in range(2):
        state, metrics = train_step(state, shared, batch, jax.random.key(step))
    return state, metrics


# ----------------------------------------------------------------------------------------------------
# one device (this process)


def test_launched_multi_process_reads_the_environment():
    assert not parallel.launched_multi_process({})
    assert not parallel.launched_multi_process({"TPU_WORKER_HOSTNAMES": "localhost", "SLURM_NTASKS": "1"})
    assert parallel.launched_multi_process({"TPU_WORKER_HOSTNAMES": "t1-w-0,t1-w-1"})
    assert parallel.launched_multi_process({"FAIRDIFF_MULTI_PROCESS": "1"})
    assert not parallel.launched_multi_process({"FAIRDIFF_MULTI_PROCESS": "0"})
    assert parallel.launched_multi_process({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert parallel.launched_multi_process({"SLURM_NTASKS": "4"})
    assert parallel.launched_multi_process({"OMPI_COMM_WORLD_SIZE": "2"})


def test_initialize_distributed_is_a_no_op_on_one_process(monkeypatch):
    for var in ("FAIRDIFF_MULTI_PROCESS", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed(multi_process=False) is False
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_make_mesh_spans_all_devices_with_an_auto_data_axis():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.shape["data"] == jax.device_count()
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert parallel.data_sharded(mesh).spec == P("data") and parallel.replicated(mesh).spec == P()


@pytest.mark.parametrize("micro_batch_size", [1, 3, 8, 16])  # 3: last micro-batch padded (8 = 3 + 3 + 2)
def test_micro_batched_gradient_equals_full_batch_gradient(micro_batch_size):
    params, shared, batch = _problem()
    grads, losses, aux = _grads_on(parallel.make_mesh(), micro_batch_size, params, shared, batch)
    ref_grads, ref_losses, ref_aux = _reference(params, shared, batch)
    _assert_trees_close(grads, ref_grads)
    _assert_trees_close(losses, ref_losses)
    _assert_trees_close(aux, ref_aux)


def test_train_step_is_grad_then_apply_gradients():
    mesh = parallel.make_mesh()
    state, metrics = _train_two_steps(mesh, micro_batch_size=3)
    params, shared, batch = _problem()
    expected = optim.create_train_state(params, optim.make_optimizer(1e-2), 0.996, seed=3)
    for _ in range(2):
        grads, losses, _ = _reference(expected.params, shared, batch)
        expected, _ = optim.apply_gradients(expected, grads)
    _assert_trees_close((state.params, state.ema_params, state.opt_state), (expected.params, expected.ema_params, expected.opt_state))
    assert int(state.step) == 2 and int(state.ema_count) == 2 and int(metrics["skipped"]) == 0
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-6)
    assert metrics["per_example_loss"].shape == (BATCH,) and metrics["aux"]["pred"].shape == (BATCH, 3)


def test_train_step_skips_update_when_one_example_is_non_finite():
    mesh = parallel.make_mesh()
    params, shared, batch = _problem(poison_index=5)
    state = parallel.replicate(optim.create_train_state(params, optim.make_optimizer(), 0.996, seed=3), mesh)
    before = jax.tree.map(np.asarray, (state.params, state.ema_params))
    state, metrics = parallel.make_train_step(_loss_fn, mesh, 3)(
        state, parallel.replicate(shared, mesh), parallel.shard_batch(batch, mesh), jax.random.key(0))
    assert int(metrics["skipped"]) == 1 and int(state.step) == 1 and int(state.ema_count) == 0
    _assert_trees_close((state.params, state.ema_params), before, atol=0)


# ----------------------------------------------------------------------------------------------------
# two devices in one process


def _two_device_checks():
    assert jax.device_count() == 2, jax.devices()
    mesh = parallel.make_mesh()
    params, shared, batch = _problem()
    ref_grads, ref_losses, ref_aux = _reference(params, shared, batch)
    for micro_batch_size in (1, 3, 4):  # 4 examples per device; 3 pads the second micro-batch
        grads, losses, aux = _grads_on(mesh, micro_batch_size, params, shared, batch)
        _assert_trees_close(grads, ref_grads)
        _assert_trees_close((losses, aux), (ref_losses, ref_aux))
        assert losses.sharding.spec == P("data") and grads["w"].sharding.is_fully_replicated

    # The trap this module avoids: per-device grad w.r.t. the replicated params is already
    # summed over devices, so a following pmean leaves 2x the true gradient.
    def naive(p, s, b):
        grads = jax.grad(lambda q: jnp.mean(_loss_fn(q, s, b, None)[0]))(p)
        return jax.tree.map(lambda g: jax.lax.pmean(g, "data"), grads)

    naive_grads = jax.jit(jax.shard_map(naive, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P()))(
        params, shared, parallel.shard_batch(batch, mesh))
    _assert_trees_close(naive_grads, jax.tree.map(lambda g: 2 * g, ref_grads))

    # The whole train step on 2 devices equals the same step on 1 device.
    one_device_mesh = parallel.make_mesh(jax.devices()[:1])
    state2, _ = _train_two_steps(mesh, micro_batch_size=3)
    state1, _ = _train_two_steps(one_device_mesh, micro_batch_size=3)
    _assert_trees_close((state2.params, state2.ema_params, state2.opt_state), (state1.params, state1.ema_params, state1.opt_state))

    # Host-side helpers: one process holds all rows.
    sharded = parallel.shard_batch(batch, mesh)
    np.testing.assert_array_equal(parallel.host_local(sharded, mesh)["x"], batch["x"])
    np.testing.assert_array_equal(parallel.gather_to_hosts(sharded)["x"], batch["x"])

    odd = jax.tree.map(lambda x: x[:7], batch)
    for place_odd_batch in (
        lambda: parallel.shard_batch(odd, mesh),
        lambda: parallel.make_grad_fn(_loss_fn, mesh, 3)(params, shared, parallel.replicate(odd, mesh), jax.random.key(0)),
    ):
        try:
            place_odd_batch()
        except ValueError as e:
            assert "7 examples" in str(e) and "2 devices" in str(e), e
        else:
            raise AssertionError("an odd batch on 2 devices must raise")
    print("two-device checks passed")


def _python_env(**extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", **extra)
    return env


def test_two_devices_match_one_device():
    result = subprocess.run(
        [sys.executable, "-c", "import test_parallel as t; t._two_device_checks()"],
        env=_python_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "two-device checks passed" in result.stdout


# ----------------------------------------------------------------------------------------------------
# two processes (the multi-host path: jax.distributed, process-local batches, cross-process psum)


def _two_process_checks(checkpoint_dir):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    assert parallel.initialize_distributed() is True  # from JAX_COORDINATOR_ADDRESS & co.
    from fairdiff_jax.training import checkpoints

    process = jax.process_index()
    assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
    mesh = parallel.make_mesh()
    params, shared, batch = _problem()
    rows = slice(process * BATCH // 2, (process + 1) * BATCH // 2)
    my_rows = jax.tree.map(lambda x: x[rows], batch)  # each host feeds only its own examples
    grads, losses, aux = _grads_on(mesh, 3, params, shared, my_rows)
    ref_grads, ref_losses, ref_aux = _reference(params, shared, batch)
    _assert_trees_close(parallel.gather_to_hosts(grads), ref_grads)
    _assert_trees_close(parallel.gather_to_hosts((losses, aux)), (ref_losses, ref_aux))
    np.testing.assert_allclose(parallel.host_local(losses, mesh), ref_losses[rows], rtol=1e-6)
    # Host-local results (e.g. face boxes) come back whole, in process (= row) order.
    np.testing.assert_array_equal(parallel.gather_to_hosts(np.full((2,), process)), [0, 0, 1, 1])

    # Train and checkpoint across both processes, then restore.
    state = parallel.replicate(optim.create_train_state(params, optim.make_optimizer(1e-2), 0.996, seed=3), mesh)
    state, _ = parallel.make_train_step(_loss_fn, mesh, 3)(
        state, parallel.replicate(shared, mesh), parallel.shard_batch(my_rows, mesh), jax.random.key(0))
    with checkpoints.Checkpointer(checkpoint_dir, every_steps=1) as checkpointer:
        assert checkpointer.save(state, {"epoch": 0, "index_in_epoch": 1})
    restored, position = checkpoints.restore_latest(checkpoint_dir, checkpoints.abstract_like(state))
    assert position == {"epoch": 0, "index_in_epoch": 1}
    _assert_trees_close(parallel.gather_to_hosts(restored), parallel.gather_to_hosts(state), atol=0)
    print(f"process {process}: two-process checks passed")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # over 10 s in the default suite (2026-12-02 durations): the slow pass keeps it
def test_two_processes_match_one_device(tmp_path):
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", f"import test_parallel as t; t._two_process_checks({str(tmp_path / 'ckpt')!r})"],
            env=_python_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for i, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, output
        assert f"process {i}: two-process checks passed" in output
