"""Mesh, shardings, multi-process start-up, and the data-parallel gradient step.

One mesh axis, 'data', over every device of every process. The LoRA state and the frozen weights are
replicated (`P()`); a batch's leading axis (the images of one prompt) is split over 'data'
(`P('data')`). The same code runs on one device, on several devices of one machine, and on multi-host
TPU VM slices or multi-node GPU jobs (one process per host, `initialize_distributed()` first).

Devices are ordered by (process, id), so process p holds the p-th contiguous block of a data-sharded
batch: `host_local` of a sharded array and `gather_to_hosts` of per-host results agree on row order.
"""

import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fairdiff_jax.training.optim import TrainState, apply_gradients

DATA_AXIS = "data"

# (per_example_losses [m], aux) = loss_fn(params, shared, micro_batch, rng); aux leaves are [m, ...].
LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, Any]]


def launched_multi_process(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment says this process is one of several of one job.

    Recognised: FAIRDIFF_MULTI_PROCESS=1 (set by scripts/tpu_vm.sh on every TPU VM worker);
    JAX_COORDINATOR_ADDRESS (manual multi-node set-up, with JAX_NUM_PROCESSES and JAX_PROCESS_ID);
    TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES listing more than one host (TPU pod slices);
    SLURM with SLURM_NTASKS > 1; Open MPI with OMPI_COMM_WORLD_SIZE > 1.
    """
    if environ.get("FAIRDIFF_MULTI_PROCESS", "").lower() in ("1", "true"):
        return True
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for hosts_var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        if len([h for h in environ.get(hosts_var, "").split(",") if h.strip()]) > 1:
            return True
    for count_var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(environ.get(count_var, "1") or "1") > 1:
            return True
    return False


def initialize_distributed(multi_process: Optional[bool] = None) -> bool:
    """Starts JAX's multi-process runtime when launched as several processes; a no-op otherwise.

    Call before anything touches a device. `multi_process=None` decides from the environment
    (`launched_multi_process`); JAX then finds the coordinator itself on TPU VMs, SLURM and Open MPI, and
    from JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID elsewhere.
    Returns whether the runtime is (now) multi-process.
    """
    if multi_process is None:
        multi_process = launched_multi_process()
    if not multi_process:
        return False
    if not jax.distributed.is_initialized():
        explicit = {}
        if "JAX_NUM_PROCESSES" in os.environ:
            explicit["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in os.environ:
            explicit["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**explicit)
    return True


def make_mesh(devices: Optional[list] = None) -> Mesh:
    """A 1-D mesh with axis 'data' over all devices of all processes (Auto axis type: shardings propagate through jit)."""
    if devices is None:
        devices = jax.devices()
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (LoRA state, frozen weights, prompt embeddings)."""
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """The leading axis is split over 'data' (a batch of images / noises)."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree on every device of the mesh. With several processes, every process must pass the
    same values (e.g. weights loaded from the same files, a state built from the same seed)."""
    sharding = replicated(mesh)

    def put(x):
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def shard_batch(host_local_tree: Any, mesh: Mesh) -> Any:
    """Host-local arrays [B_host, ...] -> global arrays [B_host * num_processes, ...] split over 'data'.

    With one process this is a plain device_put; with several, each process passes its own rows.
    """
    sharding = data_sharded(mesh)
    local_devices = len(mesh.local_devices)

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % local_devices:
            raise ValueError(f"batch of {x.shape[0]} examples does not split evenly over this host's {local_devices} devices")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, host_local_tree)


def shard_global(whole_batch_tree: Any, mesh: Mesh) -> Any:
    """Whole-batch host arrays [B, ...] (the same on every process) -> global arrays split over 'data'.

    Each process places only the rows of its own devices, so nothing crosses hosts (e.g. the face boxes and
    the OT targets every host computed for the whole batch).
    """
    sharding = data_sharded(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, whole_batch_tree)


def host_local(tree: Any, mesh: Mesh) -> Any:
    """This process's rows of data-sharded global arrays, as numpy (e.g. images for face detection)."""
    if jax.process_count() > 1:
        tree = multihost_utils.global_array_to_host_local_array(tree, mesh, P(DATA_AXIS))
    return jax.tree.map(np.asarray, tree)


def gather_to_hosts(tree: Any) -> Any:
    """Whole arrays as numpy on every process.

    A global (sharded) jax.Array comes back whole; a host-local numpy array [B_host, ...] (e.g. this
    process's face boxes) is concatenated with the other processes' along axis 0, in process order,
    which is the batch's row order (see the module docstring).
    """
    if jax.process_count() == 1:  # nothing to gather; process_allgather would run a jitted program per leaf
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _leading_size(tree: Any) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves must share one leading (example) axis, got sizes {sorted(sizes)}")
    return sizes.pop()


def make_grad_fn(loss_fn: LossFn, mesh: Mesh, micro_batch_size: int) -> Callable:
    """Data-parallel, micro-batched gradient of the mean per-example loss over the whole global batch.

    Returns `grad_fn(params, shared, batch, rng) -> (grads, per_example_losses, aux)`, to call inside jit:
      params: replicated pytree to differentiate (the LoRA).
      shared: replicated pytree passed to `loss_fn` unchanged (frozen weights, prompt embeddings, ...).
      batch:  pytree of [B, ...] arrays, B divisible by the device count, split over 'data'.
      rng:    a key; `loss_fn` gets fold_in(fold_in(rng, device index), micro-batch index). Randomness
              that must not depend on the device layout belongs in the batch (e.g. the noises).
    `loss_fn(params, shared, micro_batch, rng) -> (per_example_losses [m], aux)` runs on one device on
    m = min(`micro_batch_size`, B / n_devices) examples; aux leaves are per example, [m, ...].

    grads = (1 / B) * sum over all B examples of d loss_i / d params: exactly the single-device gradient
    of the batch-mean loss, whatever the device count and micro-batch size. Each device scans over its
    B / n_devices examples in micro-batches (one backward pass at a time bounds activation memory) and
    sums; one psum over 'data' then adds the devices' sums. When the per-device count is not a multiple
    of `micro_batch_size`, the last micro-batch is filled with copies of the last example whose losses
    are masked out (one compiled shape; the copies cost compute, not correctness).
    (The paper's code averaged micro-batch means: docs/method.md#differences-from-the-papers-code.)

    Gradient trap: inside shard_map the gradient w.r.t. a replicated input is already summed
    over devices, so a pmean after it would not average. Here the params are first cast to
    device-varying, so each device's gradient is its own, and the one explicit psum is the only sum.
    Returns grads replicated, per-example losses [B] and aux [B, ...] split over 'data'.
    """
    num_devices = mesh.shape[DATA_AXIS]

    def per_device(params, shared, batch, rng):
        local_size = _leading_size(batch)
        micro_size = min(micro_batch_size, local_size)
        num_micro = -(-local_size // micro_size)
        padded_size = num_micro * micro_size

        def to_micro_batches(x):
            if padded_size > local_size:
                x = jnp.concatenate([x, jnp.repeat(x[-1:], padded_size - local_size, axis=0)])
            return x.reshape((num_micro, micro_size) + x.shape[1:])

        micro_batches = jax.tree.map(to_micro_batches, batch)
        valid = (jnp.arange(padded_size) < local_size).reshape(num_micro, micro_size)
        device_rng = jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS))
        local_params = jax.lax.pcast(params, DATA_AXIS, to="varying")

        def summed_loss(p, micro_batch, micro_valid, key):
            losses, aux = loss_fn(p, shared, micro_batch, key)
            return jnp.sum(jnp.where(micro_valid, losses, 0.0)), (losses, aux)

        def accumulate(grad_sum, xs):
            micro_batch, micro_valid, index = xs
            key = jax.random.fold_in(device_rng, index)
            grads, (losses, aux) = jax.grad(summed_loss, has_aux=True)(local_params, micro_batch, micro_valid, key)
            return jax.tree.map(jnp.add, grad_sum, grads), (losses, aux)

        zeros = jax.tree.map(jnp.zeros_like, local_params)
        grad_sum, (losses, aux) = jax.lax.scan(accumulate, zeros, (micro_batches, valid, jnp.arange(num_micro)))
        global_size = local_size * num_devices
        grads = jax.tree.map(lambda g: jax.lax.psum(g, DATA_AXIS) / global_size, grad_sum)

        def unpad(x):
            return x.reshape((padded_size,) + x.shape[2:])[:local_size]

        return grads, unpad(losses), jax.tree.map(unpad, aux)

    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P(DATA_AXIS), P()),
        out_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
    )

    def grad_fn(params, shared, batch, rng):
        batch_size = _leading_size(batch)
        if batch_size % num_devices:
            raise ValueError(f"batch of {batch_size} examples does not split evenly over {num_devices} devices")
        return sharded(params, shared, batch, rng)

    return grad_fn


def make_train_step(loss_fn: LossFn, mesh: Mesh, micro_batch_size: int) -> Callable:
    """Jitted `train_step(state, shared, batch, rng) -> (state, metrics)`; see `make_grad_fn` for the args.

    The gradient of the global batch-mean loss, then `optim.apply_gradients` (AdamW + EMA, both skipped
    when the gradient is non-finite). The input state is donated: use only the returned one.
    metrics: `loss` (batch mean), `skipped`, `grad_norm`, `ema_decay` (replicated scalars), and
    `per_example_loss` [B] and `aux` ([B, ...] leaves) split over 'data' (`gather_to_hosts` for logging).
    """
    grad_fn = make_grad_fn(loss_fn, mesh, micro_batch_size)

    def train_step(state: TrainState, shared, batch, rng):
        grads, per_example_loss, aux = grad_fn(state.params, shared, batch, rng)
        state, metrics = apply_gradients(state, grads)
        metrics.update(loss=jnp.mean(per_example_loss), per_example_loss=per_example_loss, aux=aux)
        return state, metrics

    return jax.jit(train_step, donate_argnums=0)
