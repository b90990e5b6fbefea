#!/bin/bash
# The cw master as a Grid Engine job.
#
#   qsub -v CW_PYTHON=$(command -v python3) sge/master.sh
#   qsub -v CW_PYTHON=$(command -v python3),CW_HOME=/shared/me/.cw,CW_CLUSTER=sweep sge/master.sh
#
# It publishes its address in the cluster directory, $CW_HOME/$CW_CLUSTER
# (default ~/.cw/default), on the filesystem the login and compute nodes share:
# master.json and the secret key. Clients and workers find it there; nobody
# types a host name. Its store, cw.sqlite, lives beside them: submitting this
# script again after the job ended resumes where it stopped.
#
# Grid Engine does not pass your environment to the job: give it what it needs
# with -v (never -V for root: its jobs lose LD_* and TMPDIR anyway). CW_PYTHON
# must be the absolute path of the Python that has cw installed; the job's
# PATH is not your shell's. `cw sge up` does all of this for you, and keeps
# the workers' pool at its size.
#
#$ -N cw-master
#$ -S /bin/bash
#$ -cwd
#$ -j y
#$ -o cw-master.$JOB_ID.out
# qdel sends SIGUSR2 first (then SIGKILL after the queue's notify time)
#$ -notify

PYTHON=${CW_PYTHON:-python3}

exec "$PYTHON" -m cw.master
