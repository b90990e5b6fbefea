#!/bin/bash
# cw workers as ONE Grid Engine array job: each task is one worker, running as
# many executor processes as the slots it was given.
#
#   qsub -t 1-100 -tc 20 -v CW_PYTHON=$(command -v python3) sge/workers.sh      # 100 workers, 20 at once
#   qsub -t 1-10 -pe smp 8 -l h_rt=4:00:00,s_rt=3:58:00 -v CW_PYTHON=... sge/workers.sh
#
# Submit sge/master.sh first (or run `python -m cw.master` anywhere the
# compute nodes can reach): the workers find it through master.json in
# $CW_HOME/$CW_CLUSTER, like the clients. Pass CW_HOME / CW_CLUSTER with -v
# if you set them: the job does not inherit your environment.
#
# Stopping: with -notify, qdel sends SIGUSR2 before it kills; s_rt, if you
# set it a little below h_rt, sends SIGUSR1. On either the worker drains: it
# takes no new jobs, hands the ones it has not started back to the master
# (they cost no attempt), lets the running ones finish, and exits.
#
#$ -N cw-workers
#$ -S /bin/bash
#$ -cwd
#$ -j y
#$ -o cw-worker.$JOB_ID.$TASK_ID.out
#$ -notify

PYTHON=${CW_PYTHON:-python3}

# A task may start before the master has published itself: wait for it (5 min).
dir=${CW_HOME:-$HOME/.cw}/${CW_CLUSTER:-default}
for _ in $(seq 300); do
    [ -e "$dir/master.json" ] && break
    sleep 1
done

exec "$PYTHON" -m cw.worker --procs "${NSLOTS:-1}"
