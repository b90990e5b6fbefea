#!/usr/bin/env bash
# sge-down.sh -- stop the single-node Grid Engine cluster started by sge-up.sh.
#
#   sge-down.sh           delete all jobs, stop sge_execd and sge_qmaster; keep the
#                         configuration (the next sge-up.sh restarts in a few seconds)
#   sge-down.sh --purge   additionally wipe the spool (jobs, configuration, accounting),
#                         so that the next sge-up.sh initialises the cluster from scratch
#
# Daemons are stopped with qconf -ke / -km; stragglers are signalled by PID, taken from
# the pid files or from processes whose executable is exactly the SGE daemon binary.
# Packages stay installed (remove them with: apt-get purge 'gridengine-*').
set -uo pipefail

export SGE_ROOT=/var/lib/gridengine
export SGE_CELL=default
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

PURGE=0
case "${1:-}" in
    --purge) PURGE=1 ;;
    "") ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "sge-down: must run as root" >&2; exit 1; }
if [ -z "${SGE_CLUSTER_LOCK_HELD:-}" ]; then   # not called from sge-up.sh (which holds it)
    LOCK=/run/lock/sge-cluster.lock
    mkdir -p "$(dirname "$LOCK")"
    exec 9>"$LOCK"
    flock -w 600 9 || { echo "sge-down: could not get $LOCK" >&2; exit 1; }
fi

COMMON=$SGE_ROOT/$SGE_CELL/common
SPOOL=/var/spool/gridengine
QMASTER_BIN=/usr/lib/gridengine/sge_qmaster
EXECD_BIN=/usr/lib/gridengine/sge_execd
SHEPHERD_BIN=/usr/lib/gridengine/sge_shepherd

T0=$(date +%s.%N)
log() { echo "sge-down: [$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%5.1fs", b-a}')] $*"; }
pids_of_exe() { # binary [any]: PIDs running exactly that binary; with "any" also a
    local p comm name=${1##*/}   # deleted (since removed/upgraded) copy of it
    for p in /proc/[0-9]*; do   # -ef: same file (device+inode); builtin, so no fork per process
        if [ "$p/exe" -ef "$1" ]; then echo "${p#/proc/}"; continue; fi
        [ "${2:-}" = any ] || continue
        read -r comm 2>/dev/null < "$p/comm" || continue
        [ "$comm" = "${name:0:15}" ] || continue
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$1 (deleted)" ] && echo "${p#/proc/}"
    done
    return 0
}
# pids named in pid files, kept only if they really run binary $1, plus any other such process
daemon_pids() { # binary pidfile...
    local bin=$1 f p; shift
    {
        for f in "$@"; do
            [ -r "$f" ] || continue
            p=$(tr -dc '0-9' < "$f")
            [ -n "$p" ] || continue
            if [ "/proc/$p/exe" -ef "$bin" ] || [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "$bin (deleted)" ]; then
                echo "$p"
            fi
        done
        pids_of_exe "$bin" any
    } | sort -u
}
qm_pids() { daemon_pids "$QMASTER_BIN" "$SPOOL/qmaster/qmaster.pid" /run/gridengine/qmaster.pid; }
ex_pids() { daemon_pids "$EXECD_BIN" "$SPOOL"/execd/*/execd.pid /run/gridengine/execd.pid; }
wait_gone() { # seconds pid-function
    local end=$(( $(date +%s) + $1 ))
    while [ -n "$($2)" ]; do
        [ "$(date +%s)" -lt "$end" ] || return 1
        sleep 0.3
    done
}
signal_pids() { # signal pids...
    local sig=$1; shift
    [ $# -gt 0 ] && kill "-$sig" "$@" 2>/dev/null
    return 0
}

if [ -n "$(qm_pids)" ] && command -v qconf >/dev/null; then
    # 1. delete every job (the execd kills them), wait a little for them to go
    if [ -n "$(timeout 10 qstat -u '*' 2>/dev/null)" ]; then
        log "deleting all jobs"
        timeout 15 qdel -u '*' >/dev/null 2>&1 || true
        end=$(( $(date +%s) + 10 ))
        while [ -n "$(timeout 10 qstat -u '*' 2>/dev/null)" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 0.5; done
        [ -n "$(timeout 10 qstat -u '*' 2>/dev/null)" ] && timeout 15 qdel -f -u '*' >/dev/null 2>&1
    fi
    # 2. execd (killing any job still running), 3. qmaster
    if [ -n "$(ex_pids)" ]; then
        log "stopping sge_execd (qconf -kej all)"
        timeout 15 qconf -kej all >/dev/null 2>&1 || true
        wait_gone 15 ex_pids || true
    fi
    log "stopping sge_qmaster (qconf -km)"
    timeout 15 qconf -km >/dev/null 2>&1 || true
    wait_gone 20 qm_pids || true
fi

# stragglers: TERM, then KILL, by pid only
for f in ex_pids qm_pids; do
    p=$($f)
    [ -n "$p" ] || continue
    log "sending SIGTERM to $f: $p"
    # shellcheck disable=SC2086  # $p is a list of pids
    signal_pids TERM $p
    if ! wait_gone 20 $f; then   # qmaster's controlled shutdown takes ~8 s
        p=$($f)
        log "sending SIGKILL to $f: $p"
        # shellcheck disable=SC2086
        signal_pids KILL $p
        wait_gone 5 $f
    fi
done
# shepherds of jobs orphaned by a killed execd: kill each job's process group, then the shepherd
mypg=$(ps -o pgid= -p $$ | tr -d ' ')
for s in $(pids_of_exe "$SHEPHERD_BIN" any); do
    for c in $(ps -o pid= --ppid "$s" 2>/dev/null); do
        pg=$(ps -o pgid= -p "$c" 2>/dev/null | tr -d ' ')
        [ -n "$pg" ] && [ "$pg" != 1 ] && [ "$pg" != "$mypg" ] && kill -KILL -- "-$pg" 2>/dev/null
        kill -KILL "$c" 2>/dev/null
    done
    kill -KILL "$s" 2>/dev/null
done

left="$(qm_pids) $(ex_pids)"
if [ -n "${left// /}" ]; then
    echo "sge-down: ERROR: still running: $left" >&2
    exit 1
fi
rm -f "$SPOOL/qmaster/qmaster.pid" "$SPOOL"/execd/*/execd.pid /run/gridengine/qmaster.pid /run/gridengine/execd.pid

if [ "$PURGE" = 1 ]; then
    log "purging spool (jobs, configuration, accounting)"
    rm -rf "${SPOOL:?}"/spooldb/* "${SPOOL:?}"/qmaster/* "${SPOOL:?}"/execd/*
    rm -f "$COMMON/accounting" "$COMMON/sge-up.stamp"
fi
log "Grid Engine stopped"
