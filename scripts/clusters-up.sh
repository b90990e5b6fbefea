#!/usr/bin/env bash
# clusters-up.sh -- bring up both single-node test clusters used by cw's tests:
# SLURM (slurm-up.sh) first, then Grid Engine (sge-up.sh), and print how long
# each took.  Both run side by side (SLURM ports 6817/6818, SGE 6444/6445).
#
# Exits non-zero if either cluster fails to come up (SGE is still attempted
# when SLURM fails, so one run shows every problem).  Must run as root.
# Idempotent like the two scripts it calls: a re-run with both clusters up
# returns at once.  Tunables are those of slurm-up.sh (SLURM_UP_*) and
# sge-up.sh (SGE_*), passed through the environment.
# Stop both with: scripts/slurm-down.sh; scripts/sge-down.sh
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

T_ALL=$(now)
failed=""

t=$(now)
if bash "$HERE/slurm-up.sh"; then
    echo "clusters-up: SLURM up in $(since "$t") s"
else
    rc=$?
    echo "clusters-up: ERROR: slurm-up.sh failed (exit $rc) after $(since "$t") s" >&2
    failed="$failed slurm"
fi

t=$(now)
if bash "$HERE/sge-up.sh"; then
    echo "clusters-up: Grid Engine up in $(since "$t") s"
else
    rc=$?
    echo "clusters-up: ERROR: sge-up.sh failed (exit $rc) after $(since "$t") s" >&2
    failed="$failed sge"
fi

if [ -n "$failed" ]; then
    echo "clusters-up: FAILED:$failed (total $(since "$T_ALL") s)" >&2
    exit 1
fi
echo "clusters-up: both clusters up in $(since "$T_ALL") s"
