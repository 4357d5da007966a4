"""Plain words for why a batch job waits, for people watching `dask-hpc up` or a notebook.

SLURM's pending reasons (squeue %r) and PBS's scheduler comments are terse; a user who has
waited ten minutes wants to know whether to keep waiting or to change something. Each entry
says which of the two it is. Reasons not listed here are shown as the batch system gave them.
"""

from __future__ import annotations

import re

# (pattern found in the reason, what it means and what to do), first match wins.
ADVICE: tuple[tuple[str, str], ...] = (
    (r"\bPriority\b", "other jobs are ahead of it in the queue; it starts when its turn comes"),
    (r"\bResources\b|Insufficient amount of resource",
     "it is next, waiting for nodes to free up"),
    (r"ReqNodeNotAvail|NodeDown|PartitionDown|PartitionInactive",
     "the nodes it asked for are down or reserved; ask the site, or use another queue"),
    (r"PartitionTimeLimit|walltime.*(exceed|limit)",
     "its walltime is over the queue's limit: lower spec.*.walltime or pick another queue"),
    (r"PartitionNodeLimit|MaxCpuPerAccount|MaxMemPer|exceeds.*limit",
     "it asks for more than the queue allows: lower cores/memory/gpus or pick another queue"),
    (r"QOSMax|AssocMax|AssocGrp|QOSGrp|job limit has been reached|[Mm]ax_run",
     "your account or QOS is at its limit of running jobs or cores; it starts when some "
     "of your other jobs end"),
    (r"JobHeldUser|held by user|Hold_Types", "it is held: release it (scontrol release / qrls)"),
    (r"JobHeldAdmin|held by admin|JobHeld", "an administrator holds it: ask the site"),
    (r"InvalidAccount|InvalidQOS|Invalid account", "the account or QOS is not valid for you: "
     "fix spec.*.account"),
    (r"BeginTime|waiting for its start time", "it was told not to start before a given time"),
    (r"Dependency", "it waits for another job to finish"),
    (r"BadConstraints", "no node has the features it asks for: check extraDirectives"),
)


def waiting_reason(message: str) -> str | None:
    """The reason in a status message's parentheses (`... is queued (Resources)`)."""
    match = re.search(r"queued \(([^)]*)\)", message)
    return match.group(1) if match else None


def explain(reason: str) -> str | None:
    for pattern, advice in ADVICE:
        if re.search(pattern, reason):
            return advice
    return None
