"""Multi-host hygiene without several hosts: when jax.distributed is initialised, how often the
processes agree on a stop signal (never with one process), and the resume-step agreement.
The real two-process run is tests/test_train_runs.py::test_two_processes_with_jax_distributed.
"""

import pytest

from sessa_jax.train import loop, mesh
from sessa_jax.train.checkpoint import CheckpointError
from sessa_jax.train.config import ConfigError

CLUSTER_VARS = ("SESSA_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                "JAX_PROCESS_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "TPU_HOST_BOUNDS", "MEGASCALE_NUM_SLICES")


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "t-0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, True),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, True),
    ({"TPU_HOST_BOUNDS": "1,1,1"}, False),
    ({"TPU_HOST_BOUNDS": "2,2,1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "t-0", "MEGASCALE_NUM_SLICES": "2"}, True),
    ({"SLURM_NTASKS": "4"}, True),
    ({"SESSA_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "a,b"}, False),
    ({"SESSA_DISTRIBUTED": "1"}, True),
    ({"SESSA_DISTRIBUTED": "yes", "TPU_WORKER_HOSTNAMES": "a"}, True),
])
def test_distributed_decision(env, want):
    assert mesh.distributed_decision(env)[0] is want


def test_maybe_initialize_distributed_calls_jax_only_for_several_hosts(monkeypatch):
    calls = []
    monkeypatch.setattr(mesh.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(mesh, "_cloud_tpu_vm_hosts", lambda: 0)  # no metadata server here
    for k in CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)
    assert mesh.maybe_initialize_distributed() is False and calls == []
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t-0,t-1")
    assert mesh.maybe_initialize_distributed() is True and calls == [{}]  # jax reads the rest
    monkeypatch.setenv("SESSA_DISTRIBUTED", "0")
    assert mesh.maybe_initialize_distributed() is False and len(calls) == 1
    monkeypatch.setenv("SESSA_DISTRIBUTED", "1")
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert mesh.maybe_initialize_distributed() is True
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                         "process_id": 1}
    monkeypatch.setenv("SESSA_DISTRIBUTED", "maybe")
    with pytest.raises(ConfigError, match="SESSA_DISTRIBUTED='maybe': expected 1"):
        mesh.maybe_initialize_distributed()


def test_one_process_checks_signals_every_step_without_any_collective(monkeypatch):
    def collective(*a, **kw):
        raise AssertionError("a collective with one process")

    monkeypatch.setattr(loop, "all_processes", collective)
    s = loop.StopSignals(every=10)
    assert [s.requested(k) for k in range(1, 5)] == [None] * 4
    s.received = "SIGTERM"
    assert s.requested(5) == "SIGTERM"  # at once, not at step 10


def test_several_processes_agree_every_n_steps_and_at_checkpoints(monkeypatch):
    tags, dropped = [], []

    def fake_all_processes(code, tag):
        tags.append(tag)
        return [code, 1 if tag == "stop/9" else 0]  # process 1 got SIGTERM before step 9

    monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
    monkeypatch.setattr(loop, "all_processes", fake_all_processes)
    monkeypatch.setattr(loop, "forget", dropped.append)
    s = loop.StopSignals(every=3)
    got = {k: s.requested(k, force=(k % 4 == 0)) for k in range(1, 10)}
    assert tags == ["stop/3", "stop/4", "stop/6", "stop/8", "stop/9"]
    assert got[9] == "SIGTERM" and all(v is None for k, v in got.items() if k != 9)
    assert dropped == ["stop/3", "stop/4", "stop/6"]  # keys every process has read


def test_processes_that_disagree_on_the_resume_step_stop_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(mesh, "all_processes", lambda v, tag: [8, 4])
    with pytest.raises(CheckpointError, match=r"processes disagree on the step to resume "
                                              r"from: process 0: 8, process 1: 4; every"):
        mesh.same_on_all_processes(8, "the step to resume from", loop._SHARED_DIR_HINT)
    monkeypatch.setattr(mesh, "all_processes", lambda v, tag: [8, 8])
    assert mesh.same_on_all_processes(8, "the step to resume from") == 8
