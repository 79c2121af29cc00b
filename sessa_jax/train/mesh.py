"""Devices: multi-process start-up, the (data, fsdp, tensor) mesh, and shardings.

Parameters are placed by their logical axis names (:mod:`sessa_jax.models.partitioning`) through
the rule table of ``MeshConfig``; a dimension that the mesh axes do not divide evenly is
replicated instead (e.g. a 44-token vocabulary over tensor=8), since jit needs even shards.
Batches (G, T) are sharded over rows by the 'batch' rule (default ('data', 'fsdp')).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sessa_jax.models.partitioning import logical_to_mesh
from sessa_jax.train.config import MESH_AXES, ConfigError, MeshConfig, TrainConfig

log = logging.getLogger(__name__)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _int_env(env, key: str) -> int:
    try:
        return int(env.get(key, "") or 0)
    except ValueError:
        return 0


def tpu_host_count(env=None) -> int:
    """How many TPU hosts the environment describes (0: it does not say).

    Read without network: the worker list (TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES, as
    GKE and Cloud TPU VMs set them), the host grid of the slice (TPU_HOST_BOUNDS, e.g.
    '2,2,1'), times the slices of a multislice job (MEGASCALE_NUM_SLICES).
    """
    env = os.environ if env is None else env
    hosts = 0
    for key in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        names = [h for h in env.get(key, "").split(",") if h.strip()]
        if names:
            hosts = len(names)
            break
    if not hosts and env.get("TPU_HOST_BOUNDS"):
        try:
            hosts = math.prod(int(x) for x in env["TPU_HOST_BOUNDS"].split(","))
        except ValueError:
            hosts = 0
    slices = _int_env(env, "MEGASCALE_NUM_SLICES")
    if slices > 1:
        hosts = max(hosts, 1) * slices
    return hosts


def _cloud_tpu_vm_hosts() -> int:
    """Hosts of this slice from the Cloud TPU VM metadata (only on a TPU VM, where a metadata
    server answers; 0 anywhere else or on any failure)."""
    import glob
    import importlib.util

    if importlib.util.find_spec("libtpu") is None or not (glob.glob("/dev/accel*")
                                                          or glob.glob("/dev/vfio/[0-9]*")):
        return 0
    try:
        from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster
        return len(GceTpuCluster._get_worker_list_in_slice())  # noqa: SLF001
    except Exception:  # no metadata server, old jax: say nothing
        return 0


def distributed_decision(env=None) -> tuple[Optional[bool], str]:
    """(True: initialise / False: do not / None: ask the TPU VM metadata, why) from the
    environment; see :func:`maybe_initialize_distributed`."""
    env = os.environ if env is None else env
    force = env.get("SESSA_DISTRIBUTED", "").strip().lower()
    if force and force not in _TRUE + _FALSE:
        raise ConfigError(f"SESSA_DISTRIBUTED={env['SESSA_DISTRIBUTED']!r}: expected 1 (always "
                          "initialise jax.distributed), 0 (never) or unset (detect)")
    if force in _FALSE:
        return False, "SESSA_DISTRIBUTED=0"
    if force in _TRUE:
        return True, "SESSA_DISTRIBUTED=1"
    if _int_env(env, "SLURM_NTASKS") > 1:
        return True, "SLURM_NTASKS"
    if _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return True, "OMPI_COMM_WORLD_SIZE"
    hosts = tpu_host_count(env)
    if hosts > 1:
        return True, f"{hosts} TPU hosts"
    if hosts == 1:
        return False, "one TPU host"
    return None, "the environment names no cluster"


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize`` when the job spans several processes.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID.
    Cluster: SLURM / Open MPI; TPU whenever more than one host exists (worker list, host
    bounds or multislice variables; on a Cloud TPU VM whose environment says nothing, the
    VM metadata's worker list), which jax then reads itself. ``SESSA_DISTRIBUTED=1`` forces
    the call (jax detects the cluster), ``0`` prevents it. Returns True when it initialised.
    Must run before anything touches a JAX backend.
    """
    env = os.environ
    decision, why = distributed_decision(env)
    if decision is False:
        return False
    addr = env.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        try:
            n = int(env.get("JAX_NUM_PROCESSES", ""))
            pid = int(env.get("JAX_PROCESS_ID", ""))
        except ValueError:
            raise ConfigError(
                "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                f"integers (got {env.get('JAX_NUM_PROCESSES')!r}, {env.get('JAX_PROCESS_ID')!r})"
            ) from None
        if n <= 1 and decision is not True:
            return False
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
        return True
    if decision is None:
        hosts = _cloud_tpu_vm_hosts()
        decision, why = hosts > 1, f"{hosts} TPU hosts (VM metadata)"
    if decision:
        log.info("jax.distributed.initialize(): %s", why)
        jax.distributed.initialize()
        return True
    return False


# -- agreement between processes --------------------------------------------------------------


def _client():
    """The jax.distributed client (its key-value store needs no device), or None."""
    try:
        from jax._src import distributed
        return distributed.global_state.client
    except Exception:  # pragma: no cover - a jax without it: fall back to a collective
        return None


def all_processes(value: int, tag: str, timeout_s: float = 3600.0) -> list[int]:
    """``value`` of every process, in process order (``[value]`` with one process).

    Through the jax.distributed key-value store when there is one: host to host, no device
    work, so the host does not wait for the steps it already dispatched (a device collective
    would queue behind them). ``tag`` must be unique per call and the same on all processes.
    Without a client, ``multihost_utils.process_allgather``.
    """
    n = jax.process_count()
    if n == 1:
        return [int(value)]
    client = _client()
    if client is None:
        from jax.experimental import multihost_utils
        got = multihost_utils.process_allgather(np.int32(value))
        return [int(x) for x in np.asarray(got).reshape(-1)]
    me = jax.process_index()
    client.key_value_set(f"sessa/{tag}/{me}", str(int(value)))
    out = []
    for p in range(n):
        try:
            out.append(int(client.blocking_key_value_get(f"sessa/{tag}/{p}",
                                                         int(timeout_s * 1000))))
        except Exception as e:  # a dead or stuck process: say which
            raise RuntimeError(f"process {me}: no answer from process {p} on {tag!r} within "
                               f"{timeout_s:.0f}s ({type(e).__name__}: {e})") from None
    return out


def forget(tag: str) -> None:
    """Drop this process's key of an :func:`all_processes` call that every process has read."""
    client = _client()
    if client is not None and jax.process_count() > 1:
        try:
            client.key_value_delete(f"sessa/{tag}/{jax.process_index()}")
        except Exception:  # housekeeping only
            pass


def same_on_all_processes(value: int, what: str, hint: str = "") -> int:
    """``value``, checked equal on every process; an error listing them when not."""
    got = all_processes(value, f"same/{what.replace(' ', '_')}")
    if len(set(got)) > 1:
        from sessa_jax.train.checkpoint import CheckpointError
        raise CheckpointError(f"processes disagree on {what}: "
                              + ", ".join(f"process {i}: {v}" for i, v in enumerate(got))
                              + (f"; {hint}" if hint else ""))
    return value


# -- persistent compilation cache -------------------------------------------------------------


def set_compilation_cache(path: Optional[str]) -> Optional[str]:
    """Use JAX's persistent compilation cache in ``path`` (local or gs://...; None: leave JAX
    as it is). Call before the first compile of the run. Compiles taking at least
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` (default here 1 s: the train and eval steps,
    not every small helper) are stored; entries of any size. Returns the directory."""
    if not path:
        return None
    from jax.experimental.compilation_cache import compilation_cache as cc

    from sessa_jax.paths import user_path

    d = str(user_path(path))
    if jax.config.jax_compilation_cache_dir != d:
        cc.reset_cache()  # a cache opened earlier in this process on another directory
        cc.set_cache_dir(d)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # any size
    return d


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve -1 and check the mesh against the device count; raises ConfigError."""
    sizes = [getattr(cfg, a) for a in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    desc = " x ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if -1 in sizes:
        if n_devices % fixed:
            raise ConfigError(
                f"{desc}: {n_devices} devices are not divisible by the fixed axes' product {fixed}"
            )
        sizes[sizes.index(-1)] = n_devices // fixed
    total = math.prod(sizes)
    if total > n_devices:
        verb = "is" if n_devices == 1 else "are"
        hint = ""
        if jax.default_backend() == "cpu":
            hint = (f"; on a CPU, start with XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{total} to get {total} CPU devices")
        raise ConfigError(f"{desc} needs {total} devices, but only {n_devices} {verb} "
                          f"available{hint}")
    if total < n_devices and jax.process_count() > 1:
        raise ConfigError(
            f"{desc} uses {total} of {n_devices} devices; with several processes the mesh must "
            "use them all (set one axis to -1)"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A Mesh with axes ('data', 'fsdp', 'tensor') over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    devices = devices[: math.prod(shape)]
    auto = (jax.sharding.AxisType.Auto,) * 3  # GSPMD propagation, not explicit-sharding types
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except Exception:  # e.g. CPU or odd topologies mesh_utils has no layout for
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=auto)


def check_batch(cfg: TrainConfig, mesh: Mesh) -> None:
    """The global batch must split evenly over batch shards, microbatches and processes."""
    g = cfg.run.global_batch_size
    acc = cfg.optimizer.grad_accum_steps
    shards = batch_shards(mesh, cfg.mesh.sharding_rules())
    if g % (acc * shards):
        raise ConfigError(
            f"run.global_batch_size={g} is not divisible by optimizer.grad_accum_steps={acc} x "
            f"{shards} batch shards (mesh.data x mesh.fsdp = "
            f"{mesh.shape['data']} x {mesh.shape['fsdp']})"
        )
    if g % jax.process_count():
        raise ConfigError(f"run.global_batch_size={g} is not divisible by the "
                          f"{jax.process_count()} processes")


def batch_spec(rules) -> P:
    """PartitionSpec of a (B, T) batch."""
    return logical_to_mesh(("batch", "length"), rules)


def batch_shards(mesh: Mesh, rules) -> int:
    """How many ways the batch rows are split."""
    axes = batch_spec(rules)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(rules))


def fit_spec(spec: P, shape, mesh: Mesh) -> P:
    """Drop mesh axes from dims they don't divide (those dims are then replicated)."""
    out = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        tup = (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in tup)
        out.append(axes if shape[i] % size == 0 else None)
    return P(*out)


def param_shardings(logical_specs, abstract_params, mesh: Mesh, rules):
    """Tree of NamedShardings for params, from their logical specs (same tree structure)."""
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    mesh_specs = jax.tree.map(lambda s: logical_to_mesh(tuple(s), rules), logical_specs,
                              is_leaf=is_spec)
    return jax.tree.map(
        lambda s, a: NamedSharding(mesh, fit_spec(s, a.shape, mesh)),
        mesh_specs, abstract_params, is_leaf=is_spec,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_rows(sharding: NamedSharding, global_shape) -> tuple[int, int]:
    """(block index, block count) of the batch rows this process feeds.

    The data pipeline gives process p of P the contiguous rows [p*G/P, (p+1)*G/P). When the mesh
    replicates rows over processes (e.g. tensor parallelism across hosts) several processes feed
    the same rows; this returns the block of rows this process's devices hold and how many such
    blocks there are, to pass as (process_index, process_count) to ``sessa_jax.data.batches``.
    """
    g = global_shape[0]
    rows = set()
    for idx in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        r = idx[0]
        start, stop, _ = r.indices(g)
        rows.update(range(start, stop))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo or g % (hi - lo) or lo % (hi - lo):
        raise ConfigError(
            f"this mesh puts batch rows {sorted(rows)[:8]}... on process {jax.process_index()}: "
            "not one aligned contiguous block; change mesh.* or mesh.rules.batch"
        )
    return lo // (hi - lo), g // (hi - lo)


def global_batch(local: dict, sharding: NamedSharding, global_rows: int) -> dict:
    """This process's rows (L, T) -> global jax Arrays (G, T) laid out by ``sharding``."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:])
        for k, v in local.items()
    }


def describe(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    return (f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} "
            f"tensor={mesh.shape['tensor']} on {mesh.devices.size} x {d.device_kind} "
            f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''})")


def device_kind(mesh: Optional[Mesh] = None) -> str:
    return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).device_kind
