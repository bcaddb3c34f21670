#!/bin/bash
# One per node, started by slurm/train.sh through srun: `accelerate launch` with this node's
# machine rank; the arguments are the rest of the launch command.
#
# Signals. The launcher (torch's elastic agent) dies on USR1, orphaning the trainers, so it runs
# with USR1 ignored; the trainers inherit that until they install their own handler. This script
# passes USR1 on to the trainers (children of the launcher, each in a session of its own): with
# proctrack/linuxproc or cgroup Slurm signals them too, and the second USR1 is harmless, but with
# proctrack/pgid only this script gets it. SIGTERM is not passed on: the agent already forwards it
# to the trainers, and a second SIGTERM makes a trainer exit without its checkpoint.
set -uo pipefail
(trap '' USR1; exec python -m accelerate.commands.launch --machine_rank "${SLURM_NODEID:-0}" "$@") &
launcher=$!
trap 'pkill -USR1 -P "$launcher"' USR1
trap ':' TERM  # outlive it: srun ends the step when this script exits, killing a checkpoint mid-write
while :; do  # `wait` returns early whenever a trap ran
  wait "$launcher"; rc=$?
  kill -0 "$launcher" 2>/dev/null || exit "$rc"
done
