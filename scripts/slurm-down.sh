#!/usr/bin/env bash
# slurm-down.sh - stop the one-node SLURM cluster started by slurm-up.sh.
#
#   --purge   also delete slurmctld/slurmd state (queued jobs, job id
#             counter) and logs, so the next slurm-up.sh starts from scratch.
set -euo pipefail

PURGE=0
case "${1:-}" in
  --purge) PURGE=1 ;;
  "") ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

[[ "$(id -u)" -eq 0 ]] || { echo "slurm-down: must run as root" >&2; exit 1; }

# stop NAME: SIGTERM every process with that exact name, wait up to 30s for
# a clean exit (slurmctld saves its state on TERM), then SIGKILL.
stop() {
  local name="$1" pids i
  pids="$(pgrep -x "$name" || true)"
  [[ -n "$pids" ]] || return 0
  echo "slurm-down: stopping ${name}" >&2
  # shellcheck disable=SC2086  # may be several pids
  kill $pids 2>/dev/null || true
  for (( i = 0; i < 60; i++ )); do
    pgrep -x "$name" >/dev/null || return 0
    sleep 0.5
  done
  echo "slurm-down: ${name} ignored SIGTERM, killing" >&2
  # shellcheck disable=SC2086
  kill -9 $pids 2>/dev/null || true
}

# Compute node first, then controller, then the auth daemon both depend on.
stop slurmd
stop slurmctld
stop munged

if (( PURGE )); then
  rm -rf /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/lib/slurm/slurm-up.conf.sha256
  rm -f /var/log/slurm/*.log
fi
echo "slurm-down: stopped" >&2
