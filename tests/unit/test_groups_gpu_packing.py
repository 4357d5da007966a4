"""Worker groups, GPU scripts, job-array packing and scheduler listeners, without I/O."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from dask_hpc_operator.model import ClusterModel, GroupModel
from dask_hpc_operator.planning import DaskView, Plan, WorkerView, group_status
from dask_hpc_operator.reconcile import ClusterReconciler, Runtime
from dask_hpc_operator.site_config import SiteConfig
from dask_hpc_operator.validation import validate
from hpc_bridge.backends.local import LocalBackend
from hpc_bridge.backends.pbs import PbsBackend
from hpc_bridge.backends.pbs import array_batches as pbs_array_batches
from hpc_bridge.backends.slurm import SlurmBackend
from hpc_bridge.model import (
    JobIdentity,
    JobState,
    JobTemplate,
    ObservedJob,
    Role,
    compress_ranges,
    expand_ranges,
)
from hpc_bridge.scripts import RenderContext, render_worker, scheduler_command

SITE = SiteConfig(staging_dir="/shared/st", python="/opt/py/bin/python")
CTX = RenderContext(backend="slurm", python="/opt/py/bin/python",
                    scheduler_file="/shared/st/c/scheduler.json", log_dir="/shared/st/c/logs",
                    protocols=("tcp", "ucx"))
WORKER = JobIdentity("ns", "c", "uid-1", Role.WORKER, "gpu", 0)


def cluster(worker: dict[str, Any], **scheduler: Any) -> ClusterModel:
    body = validate({"apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskCluster",
                     "metadata": {"name": "c", "namespace": "ns"},
                     "spec": {"backend": "slurm", "worker": worker, "scheduler": scheduler}})
    body["metadata"]["uid"] = "uid-1"
    return ClusterModel.from_manifest(body, SITE)


def test_gpu_worker_script_is_exact() -> None:
    model = cluster({"replicas": 1, "cores": 8, "memory": "64GiB", "gpus": 2,
                     "queue": "gpu",
                     "cuda": {"enabled": True, "rmmPoolSize": "20GiB",
                              "deviceMemoryLimit": "30GiB", "protocol": "ucx"}})
    template = model.groups[0].template
    script = render_worker(CTX, WORKER, template).script
    lines = script.splitlines()
    assert "#SBATCH --gres=gpu:2" in lines
    assert "#SBATCH -p gpu" in lines
    assert "#SBATCH --cpus-per-task=8" in lines
    assert "#SBATCH --mem=64G" in lines
    command = shlex.split(lines[-1])
    assert command[:5] == ["/opt/py/bin/python", "-m", "dask", "cuda", "worker"]
    # One worker per GPU: threads and host memory are per GPU; no --nworkers for dask-cuda.
    assert command[command.index("--nthreads") + 1] == "4"
    assert command[command.index("--memory-limit") + 1] == "32.00GiB"
    assert "--nworkers" not in command and "--nanny" not in command
    assert command[command.index("--rmm-pool-size") + 1] == "20GiB"
    assert command[command.index("--device-memory-limit") + 1] == "30GiB"
    assert command[command.index("--protocol") + 1] == "ucx"
    # UCX workers read the ucx listener's scheduler file, and carry the GPU resource.
    assert command[command.index("--scheduler-file") + 1] == "/shared/st/c/scheduler-ucx.json"
    assert command[command.index("--resources") + 1] == "GPU=1"
    # The default group's GPU protocol makes the scheduler listen on it too.
    assert model.protocols == ("tcp", "ucx")


def test_gpu_group_on_the_primary_protocol_reads_dask_s_own_file() -> None:
    model = cluster({"gpus": 1, "cuda": {"enabled": True}})
    assert model.protocols == ("tcp",)
    command = render_worker(CTX, WORKER, model.groups[0].template).script.splitlines()[-1]
    assert "--scheduler-file /shared/st/c/scheduler.json" in command
    assert "--protocol" not in command


def test_scheduler_with_two_listeners_preloads_the_file_writer() -> None:
    argv = shlex.split(scheduler_command(CTX))
    assert argv[argv.index("--protocol") + 1] == "tcp,ucx"
    assert argv[argv.index("--port") + 1] == "0,0"
    assert argv[argv.index("--preload") + 1] == "/shared/st/c/listeners_preload.py"
    single = shlex.split(scheduler_command(RenderContext("slurm", "/p", "/s/f.json", "/s")))
    assert single[single.index("--port") + 1] == "0" and "--preload" not in single


def test_array_script_names_workers_by_task_id() -> None:
    script = render_worker(CTX, JobIdentity("ns", "c", "uid-1", Role.WORKER, "default", 4),
                           JobTemplate(), array=(4, 5, 6, 9)).script
    assert "#SBATCH --array=4-6,9" in script.splitlines()
    assert "#SBATCH -J dask.ns.c.default.array" in script.splitlines()
    assert "--name dask.ns.c.default.${SLURM_ARRAY_TASK_ID} " in script


@pytest.mark.parametrize(("indices", "text"), [
    ([0], "0"), ([0, 1, 2], "0-2"), ([5, 0, 1, 7, 8], "0-1,5,7-8"), ([3, 3, 4], "3-4"),
])
def test_compress_and_expand_ranges(indices: list[int], text: str) -> None:
    assert compress_ranges(indices) == text
    assert expand_ranges(text) == sorted(set(indices))


def test_expand_ranges_drops_the_throttle_and_honours_steps() -> None:
    assert expand_ranges("3,5-6%2") == [3, 5, 6]
    assert expand_ranges("0-6:3") == [0, 3, 6]


def _ids(n: int, group: str = "default") -> list[JobIdentity]:
    return [JobIdentity("ns", "c", "uid-1", Role.WORKER, group, i) for i in range(n)]


@pytest.mark.parametrize(("packing", "backend", "count", "requests", "array_sizes"), [
    ("auto", "slurm", 16, 1, [16]),
    ("auto", "slurm", 1, 1, [0]),
    ("array", "slurm", 1, 1, [1]),
    ("single", "slurm", 3, 3, [0, 0, 0]),
    ("auto", "local", 4, 4, [0, 0, 0, 0]),
])
def test_packing_decides_the_number_of_submissions(packing: str, backend: str, count: int,
                                                   requests: int, array_sizes: list[int],
                                                   tmp_path: Any) -> None:
    model = cluster({"replicas": count, "packing": packing})
    chosen = SlurmBackend() if backend == "slurm" else LocalBackend(tmp_path)
    ctx = RenderContext(backend, "/p", "/s/scheduler.json", "/s/logs")
    out = ClusterReconciler._worker_requests(model, ctx, _ids(count), chosen)
    assert len(out) == requests
    assert [len(r.array) for r in out] == array_sizes
    assert sorted(i.index for r in out for i in r.task_identities()) == list(range(count))


def _pbs_requests(indices: list[int], backend: PbsBackend) -> list[tuple[int, ...]]:
    model = cluster({"replicas": len(indices)})
    ctx = RenderContext("pbs", "/p", "/s/scheduler.json", "/s/logs")
    ids = [JobIdentity("ns", "c", "uid-1", Role.WORKER, "default", i) for i in indices]
    out = ClusterReconciler._worker_requests(model, ctx, ids, backend)
    return [r.array or (r.identity.index,) for r in out]


def test_pbs_packs_each_run_of_indices_in_its_own_array() -> None:
    """Replacements leave gaps; PBS's -J takes one range of two or more subjobs."""
    backend = PbsBackend(arrays=True)
    assert _pbs_requests([0, 1, 2, 3], backend) == [(0, 1, 2, 3)]
    assert _pbs_requests([2, 5, 6, 7, 9], backend) == [(5, 6, 7), (2,), (9,)]
    capped = PbsBackend(arrays=True, max_array_size=3)
    assert _pbs_requests(list(range(7)), capped) == [(0, 1, 2), (3, 4, 5), (6,)]
    assert _pbs_requests([0, 1, 2], PbsBackend(arrays=False)) == [(0,), (1,), (2,)]


def test_pbs_array_scripts_say_j_and_rerunnable() -> None:
    model = cluster({"replicas": 3})
    ctx = RenderContext("pbs", "/p", "/s/scheduler.json", "/s/logs")
    (request,) = ClusterReconciler._worker_requests(model, ctx, _ids(3), PbsBackend(arrays=True))
    lines = [line for line in request.script.splitlines() if line.startswith("#PBS")]
    assert "#PBS -J 0-2" in lines and "#PBS -r y" in lines
    assert "${PBS_ARRAY_INDEX}" in request.script


def test_group_status_names_resources_and_the_missing_cluster() -> None:
    group = GroupModel("highmem", "g-uid", 2, JobTemplate(resources=(("HIGHMEM", 1.0),)))
    waiting = group_status(group, [], None, Plan(), "waiting for DaskCluster ns/c", [], "t0")
    assert waiting["phase"] == "Pending" and waiting["resources"] == ["HIGHMEM"]
    assert {c["type"]: c["status"] for c in waiting["conditions"]}["ClusterReady"] == "False"

    jobs = [ObservedJob(f"7_{i}", JobIdentity("ns", "c", "g-uid", Role.WORKER, "highmem", i),
                        JobState.RUNNING) for i in range(2)]
    dask = DaskView("tcp://h:1", "", tuple(WorkerView(f"dask.ns.c.highmem.{i}", f"tcp://w{i}")
                                           for i in range(2)))
    running = group_status(group, jobs, dask, Plan(), "", waiting["conditions"], "t1")
    assert running["phase"] == "Running"
    assert running["workers"] == {"desired": 2, "pending": 0, "running": 2, "ready": 2}
    ready = {c["type"]: c for c in running["conditions"]}["ClusterReady"]
    assert ready["status"] == "True" and ready["lastTransitionTime"] == "t1"


async def test_group_asking_for_a_protocol_the_scheduler_lacks_is_held(tmp_path: Any) -> None:
    from dask_hpc_operator.reconcile import GroupReconciler

    runtime = Runtime(SiteConfig(staging_dir=str(tmp_path)))
    cluster_body = {"apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskCluster",
                    "metadata": {"name": "c", "namespace": "ns", "uid": "uid-1"},
                    "spec": {"backend": "local"}, "status": {"phase": "Running"}}
    group = {"apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskWorkerGroup",
             "metadata": {"name": "gpu", "namespace": "ns", "uid": "g-uid"},
             "spec": {"cluster": "c", "worker": {"gpus": 1,
                                                 "cuda": {"enabled": True, "protocol": "ucx"}}}}
    status = await GroupReconciler(runtime).reconcile_group(group, {}, cluster_body)
    assert status["phase"] == "Pending"
    assert "add ucx to its spec.scheduler.extraProtocols" in status["message"]
    assert runtime.backend("local").calls["submit"] == 0  # type: ignore[attr-defined]


class _ArrayBackend:
    """In-memory backend with PBS-style array task ids, to watch what the reconcile records."""

    kind = "pbs"
    supports_arrays = True

    def __init__(self) -> None:
        self.submitted: list[Any] = []

    def task_job_id(self, job_id: str, index: int) -> str:
        seq, _, server = job_id.partition(".")
        return f"{seq.removesuffix('[]')}[{index}].{server}"

    def array_batches(self, indices: Any) -> tuple[list[tuple[int, ...]], list[int]]:
        return pbs_array_batches(indices)

    async def submit(self, request: Any) -> str:
        self.submitted.append(request)
        return f"{100 + len(self.submitted)}[].pbs01"

    async def poll(self) -> list[ObservedJob]:
        return []

    async def cancel(self, job_ids: Any) -> None:
        pass


async def test_array_tasks_are_recorded_under_the_backend_s_ids(tmp_path: Any) -> None:
    backend = _ArrayBackend()
    runtime = Runtime(SiteConfig(staging_dir=str(tmp_path)), backends={"pbs": backend})
    body = {"apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskCluster",
            "metadata": {"name": "c", "namespace": "ns", "uid": "uid-1"},
            "spec": {"backend": "pbs", "worker": {"replicas": 3}}}
    status = await ClusterReconciler(runtime).reconcile(body, {})
    assert len(backend.submitted) == 2  # scheduler + one array of three
    assert backend.submitted[1].array == (0, 1, 2)
    ids = sorted(runtime.poller("pbs").snapshot.jobs)
    assert ids == ["101[].pbs01", "102[0].pbs01", "102[1].pbs01", "102[2].pbs01"]
    assert status["workers"]["pending"] == 3
    # The next reconcile sees them (recorded, not yet polled) and submits nothing more.
    await ClusterReconciler(runtime).reconcile(body, status)
    assert len(backend.submitted) == 2
