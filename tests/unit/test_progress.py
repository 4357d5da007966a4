"""What `dask-hpc up` prints while it waits: changes, and reasons on long queue waits."""

from __future__ import annotations

import io

from dask_hpc_operator.embedded import Progress, Resource
from dask_hpc_operator.queue_reasons import explain, waiting_reason


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cluster(message: str, phase: str = "Pending") -> Resource:
    body = {"apiVersion": "hpc.dask.org/v1alpha1", "kind": "DaskCluster",
            "metadata": {"name": "c", "namespace": "default"}}
    return Resource(body, {"phase": phase, "message": message})


def test_a_long_queue_wait_is_explained_a_few_times_not_every_poll() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, clock)
    queued = cluster("scheduler job 7 is queued (QOSMaxJobsPerUserLimit)")
    for second in range(0, 700, 5):  # a poll every 5 s for 11+ minutes
        clock.now = float(second)
        progress.show(queued)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # the change, then reminders at 30 s, 2 min and 10 min
    assert "is queued (QOSMaxJobsPerUserLimit)" in lines[0]
    assert all("still queued" in line and "limit of running jobs" in line for line in lines[1:])
    assert "after 10 min" in lines[3]


def test_changes_are_printed_at_once_and_running_clusters_are_quiet() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, clock)
    progress.show(cluster("scheduler job 7 is queued (Priority)"))
    clock.now = 3.0
    progress.show(cluster("2/2 workers ready", "Running"))
    clock.now = 3600.0
    progress.show(cluster("2/2 workers ready", "Running"))
    assert len(out.getvalue().splitlines()) == 2


def test_reasons() -> None:
    assert waiting_reason("1/4 workers ready, 3 queued (Resources)") == "Resources"
    assert waiting_reason("2/2 workers ready") is None
    assert explain("Resources") and "next" in str(explain("Resources"))
    assert "walltime" in str(explain("PartitionTimeLimit"))
    assert "next" in str(explain("Not Running: Insufficient amount of resource: ncpus"))
    assert explain("SomethingNew") is None
