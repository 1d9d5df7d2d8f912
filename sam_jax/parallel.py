"""Data parallelism on a device mesh, per-device SAM, multi-host, bf16.

One program for one device, many devices or many hosts: a 1-D
`jax.sharding.Mesh` with axis `"data"`, the batch sharded along it, the
parameters and optimizer state replicated, the step jitted once with
explicit in/out shardings and donated state (`jit_train_step`).

SAM's perturbation, two explicit choices (never a side effect of the device
count):

  global (default)  the step is jitted on the global batch: the clean
                    gradient that sets `eps` is the mean over all devices
                    (XLA inserts the all-reduce), so the result is n-SAM on
                    the global batch, the same on 1 or 64 devices.
  per device        `per_device(grad_fn, mesh)`: each device computes the
                    method's gradient on its own shard of the batch with
                    `shard_map` (its own `eps` from its local gradient), then
                    the gradients are averaged with `lax.pmean`. With B
                    examples on D devices this is m-SAM with m = B / D
                    (PAPERS.md A1; Foret et al.'s m-sharpness).

Multi-host: `maybe_initialize_distributed()` calls
`jax.distributed.initialize()` (the coordinator from the cluster, e.g.
a Cloud TPU pod or SLURM, or from `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`). Each process then loads only its
slice of every global batch (`process_slice`) and `global_batch` assembles
the global, sharded array from the process-local pieces.

Mixed precision (`ComputeDtype`): parameters, optimizer state and gradients
stay float32; the forward and backward passes run in bfloat16 (parameters
and inputs are cast inside `apply`, logits and features are cast back to
float32, so the loss and its residual are float32). Gradient norms are
accumulated in float32 (`sam_jax.sam.global_norm`).
"""

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Array = jax.Array
DATA = "data"  # The name of the mesh axis the batch is sharded along.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh with axis `"data"` over the first `num_devices` devices.

  Args:
    num_devices: how many of `jax.devices()` (all hosts) to use; None for
      all. Fewer than all only makes sense on one host (tests, ablations).

  Raises:
    ValueError: if `num_devices` is not in `[1, jax.device_count()]`.
  """
  total = jax.device_count()
  n = total if num_devices is None else num_devices
  if not isinstance(n, int) or not 1 <= n <= total:
    raise ValueError(
      f"num_devices must be an int in [1, {total}] (the devices there are), "
      f"got {num_devices!r}"
    )
  if n == total:
    # jax.make_mesh orders devices so that each process's devices are
    # contiguous along the axis, as `global_batch` assumes.
    # Auto axes: the compiler propagates the shardings (jax's default is
    # now Explicit, sharding in types, which the model code does not need).
    return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,))
  return Mesh(
    np.asarray(jax.devices()[:n]), (DATA,), axis_types=(AxisType.Auto,)
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split along `"data"`, the rest whole."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device (parameters, optimizer state)."""
  return NamedSharding(mesh, P())


def process_slice(global_batch_size: int) -> slice:
  """This process's part of a global batch: the `process_index()`-th of
  `process_count()` equal, contiguous parts.

  Raises:
    ValueError: if the processes cannot split the batch evenly.
  """
  n, p = jax.process_count(), jax.process_index()
  if global_batch_size % n:
    raise ValueError(
      f"the global batch size {global_batch_size} must be divisible by the "
      f"number of processes {n}"
    )
  per = global_batch_size // n
  return slice(p * per, (p + 1) * per)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """The global batch, sharded along `"data"`, from this process's slices.

  Each leaf of `local_batch` holds this process's `process_slice` of the
  global batch (all of it on one host); the result is a `jax.Array` of the
  global shape. Only the local slice is copied to this host's devices.
  """
  sharding = batch_sharding(mesh)
  n = jax.process_count()

  def one(a):
    a = np.asarray(a)
    shape = (a.shape[0] * n,) + a.shape[1:]
    return jax.make_array_from_process_local_data(sharding, a, shape)

  return jax.tree.map(one, local_batch)


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
  """Raises ValueError naming `field` unless the mesh splits the batch."""
  d = mesh.shape[DATA]
  if batch_size % d:
    raise ValueError(
      f"config.{field}={batch_size} must be divisible by the {d} devices "
      "of the mesh"
    )


def per_device(
  grad_fn: Callable[..., tuple[Array, Any]],
  mesh: Mesh,
  batch_argnum: int = 1,
) -> Callable[..., tuple[Array, Any]]:
  """Runs `grad_fn` per device on its shard of the batch, then averages.

  `grad_fn(*args) -> (loss, grads)` with the batch at `batch_argnum` (the
  other arguments replicated). Each device calls it on its `B / D`
  examples, so a SAM method takes its perturbation from the local gradient;
  the losses and gradients (every output leaf) are then averaged over the
  devices with `lax.pmean`. A PRNG key argument (a typed key, or a raw
  uint32 key of shape [2]) is folded with the device index, so that
  stochastic methods draw independent noise per device.

  The result equals `grad_fn` with SAM's `group_size = B / D` on one
  device (m-sharpness), up to floating-point reassociation. Model state
  (BatchNorm) is not its business: `train.make_train_step` moves the
  running averages by a clean full-batch pass outside it.
  """

  def local(*args):
    # The replicated arguments are marked as varying across devices: else
    # the transpose of their implicit broadcast would sum the gradients over
    # the devices (shard_map's check_vma semantics), and no device would
    # see its own local gradient.
    to_varying = lambda a: jax.lax.pcast(a, DATA, to="varying")
    args = tuple(
      a if i == batch_argnum else jax.tree.map(to_varying, a)
      for i, a in enumerate(args)
    )
    i = jax.lax.axis_index(DATA)
    args = tuple(jax.random.fold_in(a, i) if _is_key(a) else a for a in args)
    out = grad_fn(*args)
    return jax.tree.map(lambda o: jax.lax.pmean(o, DATA), out)

  def wrapped(*args):
    # One spec per argument, a prefix of its pytree.
    specs = tuple(
      P(DATA) if i == batch_argnum else P() for i in range(len(args))
    )
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)

  return wrapped


def _is_key(a: Any) -> bool:
  if not isinstance(a, jax.Array):
    return False
  if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    return True
  return a.dtype == jnp.uint32 and a.shape == (2,)


def jit_train_step(
  train_step: Callable[..., tuple[Any, dict]],
  mesh: Mesh,
  state_example: Any,
) -> Callable[..., tuple[Any, dict]]:
  """`train_step(state, batch, key)` jitted on the mesh.

  State replicated (donated: updated in place), batch sharded along
  `"data"`, key and metrics replicated. `state_example` (arrays or
  `jax.ShapeDtypeStruct`s) gives the state's tree structure.
  """
  state_sh = jax.tree.map(lambda _: replicated(mesh), state_example)
  return jax.jit(
    train_step,
    in_shardings=(state_sh, batch_sharding(mesh), replicated(mesh)),
    out_shardings=(state_sh, replicated(mesh)),
    donate_argnums=0,
  )


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts a pytree (identical on every process) on all devices of the mesh.

  Always a copy, so that donating the result never deletes `tree`.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    # Through the host: device_put may alias a buffer already on a device.
    return jax.device_put(jax.tree.map(np.array, tree), sharding)
  return jax.tree.map(
    lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
    tree,
  )


@dataclasses.dataclass(frozen=True)
class ComputeDtype:
  """A flax module whose forward pass runs in `dtype`, parameters kept.

  `init` is the module's (float32 parameters); `apply` casts the floating
  parameters, variables and inputs to `dtype`, runs the module and casts
  every floating output (logits, features, updated collections) to
  float32. Gradients with respect to the float32 parameters come back as
  float32. Use it wherever a module is expected by `models.make_objective`
  and `models.features_fn` (it has `init` and `apply`).
  """

  module: Any
  dtype: Any = jnp.bfloat16

  def __getattr__(self, name: str) -> Any:
    # The module's fields (e.g. `norm`, read by sam_jax.methods' checks).
    if name == "module":  # Not set yet (copy, unpickling): no recursion.
      raise AttributeError(name)
    return getattr(self.module, name)

  def init(self, *args, **kwargs):
    return self.module.init(*args, **kwargs)

  def apply(self, variables, *args, **kwargs):
    cast = lambda tree, dt: jax.tree.map(lambda a: _cast(a, dt), tree)
    out = self.module.apply(
      cast(variables, self.dtype), *cast(args, self.dtype), **kwargs
    )
    return cast(out, jnp.float32)


def _cast(a: Any, dtype: Any) -> Any:
  if isinstance(a, (jax.Array, np.ndarray)) and jnp.issubdtype(
    a.dtype, jnp.floating
  ):
    return a.astype(dtype)
  return a


def with_compute_dtype(module: Any, dtype_name: str) -> Any:
  """`module` itself for "float32", `ComputeDtype(module, bf16)` for
  "bfloat16".

  Raises:
    ValueError: an unknown name.
  """
  if dtype_name not in DTYPES:
    raise ValueError(
      f"config.dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}"
    )
  if dtype_name == "float32":
    return module
  return ComputeDtype(module, DTYPES[dtype_name])


def maybe_initialize_distributed(
  enabled: Optional[bool] = None,
  environ: Optional[Mapping[str, str]] = None,
  initialize: Callable[..., None] = jax.distributed.initialize,
) -> bool:
  """Initialises multi-host JAX (`jax.distributed.initialize`) if asked.

  Asked when `enabled` is True, or when `enabled` is None and the variable
  `JAX_COORDINATOR_ADDRESS` (host:port of process 0) is set. The process
  count and id come from `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` when set;
  otherwise jax detects them (Cloud TPU pods, SLURM, Open MPI), so on a TPU
  pod `enabled=True` (`--distributed` in `experiments.main`) is all it
  takes. Must run before any other jax call that touches devices.

  Returns:
    Whether it initialised.

  Raises:
    ValueError: a non-integer `JAX_NUM_PROCESSES` or `JAX_PROCESS_ID`.
  """
  env = os.environ if environ is None else environ
  if enabled is None:
    enabled = bool(env.get("JAX_COORDINATOR_ADDRESS"))
  if not enabled:
    return False
  kwargs = {}
  for var, arg in (
    ("JAX_NUM_PROCESSES", "num_processes"),
    ("JAX_PROCESS_ID", "process_id"),
  ):
    if env.get(var):
      try:
        kwargs[arg] = int(env[var])
      except ValueError:
        raise ValueError(f"{var} must be an int, got {env[var]!r}") from None
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
  initialize(**kwargs)
  return True


def devices_summary(mesh: Mesh) -> dict[str, Any]:
  """Process and device counts of a run, for its summary."""
  return {
    "process_count": jax.process_count(),
    "device_count": int(mesh.devices.size),
    "local_device_count": jax.local_device_count(),
    "platform": jax.devices()[0].platform,
  }
