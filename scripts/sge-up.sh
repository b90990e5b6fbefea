#!/usr/bin/env bash
# sge-up.sh -- bring up a single-node (Son of) Grid Engine 8.1.9 cluster on this
# machine for cw's tests and examples: sge_qmaster + sge_execd from the Debian
# packages gridengine-master / gridengine-exec / gridengine-client (installed
# with apt-get when missing, debconf preseeded), started directly (no systemd).
#
# Must run as root.  Idempotent: when the cluster is already up with the same
# settings it exits 0 at once; otherwise it (re)installs, (re)configures and
# (re)starts what is missing.  Exits non-zero with diagnostics (log tails,
# qstat -f) if the queue does not come up.  Stop it with sge-down.sh (same
# directory).  Coexists with slurm-up.sh (SGE uses ports 6444/6445).
#
# Tunables (environment variables):
#   SGE_SLOTS             slots of the queue on this host     (default: max(4, nproc))
#   SGE_QUEUE             cluster queue name                  (default: all.q)
#   SGE_SHELL_START_MODE  unix_behavior | posix_compliant     (default: unix_behavior,
#                         i.e. the job script's #! line is honoured like a normal exec)
#   SGE_UP_TIMEOUT        seconds to wait for the queue       (default: 60)
#   SGE_UP_SMOKETEST      1 = after a cold start, run one 'qsub -sync y' job (default: 1)
#   SGE_UP_FORCE          1 = re-apply the configuration even if the cluster looks up
#
# Configuration applied: host_aliases (the host's address may reverse-resolve
# to another name, e.g. 127.0.0.1 -> localhost), min_uid/min_gid 0 (root may
# run jobs), queue with no load thresholds, job_load_adjustments NONE,
# schedule_interval 0:0:1, flush_submit_sec 1, flush_finish_sec 1, accounting
# flushed at once (qacct).  The daemons run under `env -i` (+ setsid) so the
# caller's environment does not leak into every job.
#
# Afterwards the q* commands work as-is for any user (Debian's wrappers read
# /etc/default/gridengine).  Other tools (e.g. DRMAA) want:
#   . /var/lib/gridengine/default/common/settings.sh   # SGE_ROOT, SGE_CELL, SGE_ARCH
#
# Gotchas with these packages:
#  * a job name may not contain a space: 'qsub -b y "echo hi"' fails with the cryptic
#    "Unable to run job: Error reading answer list from qmaster" -> always pass -N name.
#  * -b y joins the arguments with spaces and hands them to a (login) bash, so
#    'qsub -b y -N x "echo \$JOB_ID"' works, 'qsub -b y sh -c "..."' does not.
#  * jobs owned by root get TMPDIR, LD_* , BASH_ENV, ENV... removed (SGE sanitises the
#    environment of privileged jobs); TMP still points to the per-task tmp dir.
#  * output goes to $HOME unless -cwd / -o is given; array output: NAME.oJOB.TASK.
#  * gridengine-* depend on libmunge2: purging munge/libmunge2 (e.g. a SLURM reinstall)
#    removes them; just run this script again (it reinstalls and restarts).
#  * logs: /var/spool/gridengine/qmaster/messages, /var/spool/gridengine/execd/*/messages
set -euo pipefail

export SGE_ROOT=/var/lib/gridengine
export SGE_CELL=default
export DEBIAN_FRONTEND=noninteractive
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOST=$(hostname)
QUEUE=${SGE_QUEUE:-all.q}
NPROC=$(nproc 2>/dev/null || echo 1)
SLOTS=${SGE_SLOTS:-$(( NPROC > 4 ? NPROC : 4 ))}
MODE=${SGE_SHELL_START_MODE:-unix_behavior}
TIMEOUT=${SGE_UP_TIMEOUT:-60}
SMOKE=${SGE_UP_SMOKETEST:-1}
FORCE=${SGE_UP_FORCE:-0}

COMMON=$SGE_ROOT/$SGE_CELL/common
SPOOL=/var/spool/gridengine
STAMP=$COMMON/sge-up.stamp
QMASTER_BIN=/usr/lib/gridengine/sge_qmaster
EXECD_BIN=/usr/lib/gridengine/sge_execd
PKGS=(gridengine-master gridengine-exec gridengine-client)
APT_OPTS=(-o DPkg::Lock::Timeout=900 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
# Daemons get a clean, init-like environment: jobs inherit sge_execd's environment
# (execd_params INHERIT_ENV defaults to TRUE), so whatever the caller of this script
# had (PYTHONPATH, VIRTUAL_ENV, CI secrets...) must not leak into every job.
DAEMON_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
            SGE_ROOT="$SGE_ROOT" SGE_CELL="$SGE_CELL")
WANT_STAMP="v1 host=$HOST queue=$QUEUE slots=$SLOTS mode=$MODE"
T_START=$(date +%s)

T0=$(date +%s.%N)
log() { echo "sge-up: [$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%5.1fs", b-a}')] $*"; }
diag() {
    echo "---- sge-up diagnostics ----"
    echo "hostname=$HOST  resolves to: $(getent hosts "$HOST" | head -1 || echo '<unresolvable>')"
    echo "qmaster pids: $(pids_of_exe "$QMASTER_BIN" any | tr '\n' ' ')  execd pids: $(pids_of_exe "$EXECD_BIN" any | tr '\n' ' ')"
    [ -f "$COMMON/host_aliases" ] && echo "host_aliases: $(cat "$COMMON/host_aliases")"
    local f
    for f in "$SPOOL"/qmaster/messages "$SPOOL"/execd/*/messages /tmp/qmaster_messages /tmp/execd_messages \
             /run/gridengine/sge_qmaster.out /run/gridengine/sge_execd.out; do
        [ -s "$f" ] || continue
        echo "---- tail $f"; tail -n 15 "$f"
    done
    command -v qstat >/dev/null && { echo "---- qstat -f"; timeout 10 qstat -f 2>&1 | head -20; } || true
}
die() { echo "sge-up: ERROR: $*" >&2; diag >&2 || true; exit 1; }

# PIDs whose executable is exactly $1 (zombies and other binaries never match).
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
running() { [ -n "$(pids_of_exe "$1" any)" ]; }         # also from a deleted binary
running_current() { [ -n "$(pids_of_exe "$1")" ]; }     # from the installed binary
not_running() { [ -z "$(pids_of_exe "$1" any)" ]; }
signal_exe() { # signal binary: signal exactly the processes running that binary
    local p
    for p in $(pids_of_exe "$2" any); do kill "-$1" "$p" 2>/dev/null || true; done
}
pkgs_missing() {
    local p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -qx 'install ok installed' || echo "$p"
    done
}
qmaster_answers() { timeout 10 qconf -sh >/dev/null 2>&1; }
# "ok" when the queue instance is listed without any state flag and with a load value.
qi_state() {
    local line
    line=$(timeout 10 qstat -f -q "$QUEUE@$HOST" 2>/dev/null | awk -v qi="$QUEUE@$HOST" '$1 == qi') || true
    [ -n "$line" ] || { echo "missing"; return; }
    # columns: queuename qtype resv/used/tot load_avg arch [states]
    # shellcheck disable=SC2086  # split into columns on purpose
    set -- $line
    if [ $# -ge 6 ]; then echo "$6"; elif [ "$4" = "-NA-" ]; then echo "noload"; else echo "ok"; fi
}

[ "$(id -u)" = 0 ] || { echo "sge-up: must run as root" >&2; exit 1; }
# one sge-up/sge-down at a time (fd 9 is closed for the daemons, see DAEMON_ENV users)
LOCK=/run/lock/sge-cluster.lock
mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
flock -w 600 9 || { echo "sge-up: could not get $LOCK" >&2; exit 1; }
export SGE_CLUSTER_LOCK_HELD=1

# ---------------------------------------------------------------- fast path
if [ "$FORCE" != 1 ] && [ -z "$(pkgs_missing)" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT_STAMP" ] \
   && running_current "$QMASTER_BIN" && running_current "$EXECD_BIN" && [ "$(qi_state)" = ok ]; then
    log "cluster already up ($QUEUE@$HOST, $SLOTS slots); nothing to do"
    exit 0
fi

# ---------------------------------------------------------------- host name
# SGE needs the host name to resolve.  Only if it does not, map it to loopback.
if ! getent hosts "$HOST" >/dev/null; then
    log "hostname '$HOST' does not resolve; adding '127.0.0.1 $HOST' to /etc/hosts"
    echo "127.0.0.1 $HOST" >> /etc/hosts
fi
# The reverse lookup of the host's address may give another name (here 127.0.0.1
# -> localhost), and qmaster names peers by reverse lookup.  host_aliases makes
# every such name mean $HOST for SGE.
aliases() {
    local ip n names=("$HOST")
    for ip in $(getent ahostsv4 "$HOST" | awk '{print $1}' | sort -u) 127.0.0.1; do
        for n in $(getent hosts "$ip" | cut -d' ' -f2- ); do names+=("$n"); done
    done
    names+=(localhost "$(getent hosts "$HOST" | awk '{print $2}')")
    printf '%s\n' "${names[@]}" | awk 'NF && !seen[$1]++' | tr '\n' ' ' | sed 's/ $//'
}
ALIASES=$(aliases)
files_changed=0
mkdir -p "$COMMON"
write_if_changed() { # file content
    if [ "$(cat "$1" 2>/dev/null)" != "$2" ]; then
        printf '%s\n' "$2" > "$1"; chmod 644 "$1"; files_changed=1
    fi
}
# Written before installing, so the packages' postinst scripts keep them.
write_if_changed "$COMMON/host_aliases" "$ALIASES"
write_if_changed "$COMMON/act_qmaster" "$HOST"

# ---------------------------------------------------------------- packages
missing=$(pkgs_missing | tr '\n' ' ')
if [ -n "$missing" ]; then
    log "installing: $missing"
    t0=$(date +%s)
    debconf-set-selections <<EOF
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string $SGE_CELL
gridengine-common shared/gridenginemaster string $HOST
gridengine-master shared/gridengineconfig boolean true
gridengine-master shared/gridenginecell string $SGE_CELL
gridengine-master shared/gridenginemaster string $HOST
gridengine-exec shared/gridengineconfig boolean true
gridengine-exec shared/gridenginecell string $SGE_CELL
gridengine-exec shared/gridenginemaster string $HOST
gridengine-client shared/gridengineconfig boolean true
gridengine-client shared/gridenginecell string $SGE_CELL
gridengine-client shared/gridenginemaster string $HOST
EOF
    APT_LOG=/tmp/sge-up-apt.log
    apt-get "${APT_OPTS[@]}" update -q >"$APT_LOG" 2>&1 || log "warning: apt-get update failed; trying install anyway"
    if ! apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends "${PKGS[@]}" >>"$APT_LOG" 2>&1; then
        tail -n 30 "$APT_LOG" >&2
        die "apt-get install ${PKGS[*]} failed (log: $APT_LOG)"
    fi
    log "packages installed in $(( $(date +%s) - t0 )) s"
fi
id sgeadmin >/dev/null 2>&1 || die "user sgeadmin missing (gridengine-common postinst did not run?)"
chown sgeadmin:sgeadmin "$COMMON/host_aliases" "$COMMON/act_qmaster"

# ---------------------------------------------------------------- stale state
# Spool made for another host name (e.g. image built elsewhere): start afresh.
old_host=$(sed -n 's/.* host=\([^ ]*\) .*/\1/p' "$STAMP" 2>/dev/null || true)
if [ -n "$old_host" ] && [ "$old_host" != "$HOST" ]; then
    log "spool was configured for host '$old_host', now '$HOST': purging it"
    bash "$HERE/sge-down.sh" --purge || die "sge-down.sh --purge failed"
elif [ "$files_changed" = 1 ] && { running "$QMASTER_BIN" || running "$EXECD_BIN"; }; then
    log "host files changed while daemons ran: restarting them"
    bash "$HERE/sge-down.sh" || die "sge-down.sh failed"
elif { running "$QMASTER_BIN" && ! running_current "$QMASTER_BIN"; } \
     || { running "$EXECD_BIN" && ! running_current "$EXECD_BIN"; }; then
    # e.g. the packages were removed (purging libmunge2 removes them!) and reinstalled
    log "daemons run deleted (removed/upgraded) binaries: restarting them"
    bash "$HERE/sge-down.sh" || die "sge-down.sh failed"
fi
rm -f "$STAMP"

# ---------------------------------------------------------------- spool / cell
for d in "$SGE_ROOT" "$SGE_ROOT/$SGE_CELL" "$COMMON" "$SPOOL/qmaster" "$SPOOL/qmaster/job_scripts" \
         "$SPOOL/spooldb" "$SPOOL/execd" /run/gridengine; do
    mkdir -p "$d"; chown sgeadmin:sgeadmin "$d"; chmod 755 "$d"
done
[ -s "$COMMON/bootstrap" ] || install -m644 -o sgeadmin -g sgeadmin /usr/share/gridengine/default-bootstrap "$COMMON/bootstrap"
[ -s /etc/default/gridengine ] || sed "s@^SGE_CELL=.*@SGE_CELL=$SGE_CELL@" \
    /usr/share/gridengine/templates/gridengine.default > /etc/default/gridengine
if [ ! -e "$SPOOL/spooldb/sge" ]; then
    log "initialising spool database"
    su -s /bin/sh -c "/usr/share/gridengine/scripts/init_cluster $SGE_ROOT $SGE_CELL $SPOOL/spooldb sgeadmin" sgeadmin \
        >/dev/null || die "init_cluster failed"
fi

# ---------------------------------------------------------------- qmaster
wait_for() { # seconds command...
    local limit=$1; shift
    local end=$(( $(date +%s) + limit ))
    until "$@"; do
        [ "$(date +%s)" -lt "$end" ] || return 1
        sleep 0.3
    done
}
if ! running "$QMASTER_BIN"; then
    # An execd that outlived its qmaster takes ~30 s to re-register; restarting it is faster.
    if running "$EXECD_BIN"; then
        log "sge_execd runs without sge_qmaster: restarting it too"
        signal_exe TERM "$EXECD_BIN"
        wait_for 10 not_running "$EXECD_BIN" || signal_exe KILL "$EXECD_BIN"
    fi
    rm -f "$SPOOL/qmaster/qmaster.pid" /run/gridengine/qmaster.pid
    log "starting sge_qmaster"
    (cd / && "${DAEMON_ENV[@]}" setsid /usr/sbin/sge_qmaster </dev/null >/run/gridengine/sge_qmaster.out 2>&1 9>&-) || die "sge_qmaster failed to start"
fi
# wait until qmaster answers; give up early if it is gone (e.g. port 6444 taken)
end=$(( $(date +%s) + 30 )); gone=0
while :; do
    if running "$QMASTER_BIN"; then
        gone=0
        qmaster_answers && break
    else
        gone=$(( gone + 1 ))
        [ "$gone" -lt 3 ] || die "sge_qmaster exited after start (port 6444 taken? see its messages)"
    fi
    [ "$(date +%s)" -lt "$end" ] || die "sge_qmaster does not answer (qconf -sh)"
    sleep 0.3
done

# ---------------------------------------------------------------- configuration
TMPD=$(mktemp -d); trap 'rm -rf "$TMPD"' EXIT
# join "\"-continued lines, then set "key value" (replacing or appending)
unwrap() { awk '{ if (c) sub(/^[ \t]+/, ""); c = sub(/[ \t]*\\$/, " "); printf "%s", $0; if (!c) print "" }'; }
setkv() { # file key value
    awk -v k="$2" -v v="$3" '$1 == k { printf "%-28s %s\n", k, v; done = 1; next } { print } END { if (!done) printf "%-28s %s\n", k, v }' \
        "$1" > "$1.new" && mv "$1.new" "$1"
}
# global configuration (file must be named after the configuration: "global")
timeout 20 qconf -sconf global > "$TMPD/global.raw" 2>/dev/null || die "qconf -sconf global failed"
unwrap < "$TMPD/global.raw" | grep -v '^#' > "$TMPD/global"
setkv "$TMPD/global" min_uid 0                # default 1000 => root's jobs would be refused
setkv "$TMPD/global" min_gid 0
setkv "$TMPD/global" load_report_time 00:00:05
setkv "$TMPD/global" execd_params ENABLE_ADDGRP_KILL=TRUE
setkv "$TMPD/global" reporting_params "accounting=true reporting=false flush_time=00:00:01 accounting_flush_time=00:00:00 joblog=false sharelog=00:00:00"
timeout 20 qconf -Mconf "$TMPD/global" >/dev/null 2>&1 || die "qconf -Mconf global failed"
# scheduler: schedule every second and right after submits/finishes; no load tricks
timeout 20 qconf -ssconf > "$TMPD/sched.raw" 2>/dev/null || die "qconf -ssconf failed"
unwrap < "$TMPD/sched.raw" > "$TMPD/sched"
setkv "$TMPD/sched" schedule_interval 0:0:1
setkv "$TMPD/sched" flush_submit_sec 1
setkv "$TMPD/sched" flush_finish_sec 1
setkv "$TMPD/sched" job_load_adjustments NONE
setkv "$TMPD/sched" load_adjustment_decay_time 0:0:0
timeout 20 qconf -Msconf "$TMPD/sched" >/dev/null 2>&1 || die "qconf -Msconf failed"
# hosts: root is already a manager; $HOST is admin (added by qmaster), make it submit + exec host
timeout 20 qconf -sh 2>/dev/null | grep -qx "$HOST" || timeout 20 qconf -ah "$HOST" >/dev/null 2>&1 || true
timeout 20 qconf -ss 2>/dev/null | grep -qx "$HOST" || timeout 20 qconf -as "$HOST" >/dev/null 2>&1 || true
timeout 20 qconf -ss 2>/dev/null | grep -qx "$HOST" || die "cannot make $HOST a submit host"
if ! timeout 20 qconf -se "$HOST" >/dev/null 2>&1; then
    printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' \
        "$HOST" > "$TMPD/exechost"
    timeout 20 qconf -Ae "$TMPD/exechost" >/dev/null 2>&1 || die "qconf -Ae $HOST failed"
fi
# parallel environments shipped with the package (smp = several slots on one host)
for pe in /usr/share/gridengine/util/resources/pe/*; do
    timeout 20 qconf -sp "$(basename "$pe")" >/dev/null 2>&1 || timeout 20 qconf -Ap "$pe" >/dev/null 2>&1 || true
done
printf 'group_name @allhosts\nhostlist %s\n' "$HOST" > "$TMPD/allhosts"
if timeout 20 qconf -shgrp @allhosts >/dev/null 2>&1; then hg=-Mhgrp; else hg=-Ahgrp; fi
timeout 20 qconf $hg "$TMPD/allhosts" >/dev/null 2>&1 || die "qconf $hg @allhosts failed"
pes=$(timeout 20 qconf -spl 2>/dev/null | tr '\n' ' ' | sed 's/ *$//'); pes=${pes:-NONE}
cat > "$TMPD/queue" <<EOF
qname                 $QUEUE
hostlist              @allhosts
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               $pes
rerun                 FALSE
slots                 $SLOTS
tmpdir                /tmp
shell                 /bin/bash
prolog                NONE
epilog                NONE
shell_start_mode      $MODE
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
EOF
if timeout 20 qconf -sq "$QUEUE" >/dev/null 2>&1; then qa=-Mq; else qa=-Aq; fi
timeout 20 qconf $qa "$TMPD/queue" >/dev/null 2>&1 || die "qconf $qa $QUEUE failed"

# ---------------------------------------------------------------- execd
if ! running "$EXECD_BIN"; then
    rm -f /run/gridengine/execd.pid
    log "starting sge_execd"
    (cd / && "${DAEMON_ENV[@]}" setsid /usr/sbin/sge_execd </dev/null >/run/gridengine/sge_execd.out 2>&1 9>&-) || die "sge_execd failed to start"
fi

# ---------------------------------------------------------------- wait for the queue
end=$(( $(date +%s) + TIMEOUT ))
while :; do
    st=$(qi_state)
    [ "$st" = ok ] && break
    case $st in
        *E*) timeout 10 qmod -cq "$QUEUE@$HOST" >/dev/null 2>&1 || true ;;   # clear error state
        *d*) timeout 10 qmod -e "$QUEUE@$HOST" >/dev/null 2>&1 || true ;;    # enable
    esac
    running "$EXECD_BIN" || die "sge_execd is not running"
    [ "$(date +%s)" -lt "$end" ] || die "queue instance $QUEUE@$HOST not available after ${TIMEOUT}s (state: $st)"
    sleep 0.5
done
log "queue instance $QUEUE@$HOST is available ($SLOTS slots)"

if [ "$SMOKE" = 1 ]; then
    t0=$(date +%s.%N)
    (cd /tmp && timeout 60 qsub -sync y -b y -j y -o /dev/null -N sge-up-smoke /bin/true >/dev/null 2>&1) \
        || die "smoke-test job (qsub -sync y /bin/true) failed"
    log "smoke-test job ran in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
fi

echo "$WANT_STAMP" > "$STAMP"
log "Grid Engine is up in $(( $(date +%s) - T_START )) s: qmaster+execd on $HOST, queue $QUEUE ($SLOTS slots)," \
    "SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL"
