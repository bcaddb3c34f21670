#!/bin/bash
# A sweep as a Slurm job array: one task per run, each with slurm/train.sh's nodes, preemption and
# requeue (Slurm requeues the one task, not the array).
#
#   python -m trainer.sweep SWEEP.yaml CONFIG [overrides ...]       # first: check it, list the tasks
#   sbatch --array=0-N [sbatch options] slurm/sweep.sh SWEEP.yaml CONFIG [overrides ...]
#   sbatch --array=0-N [sbatch options] slurm/sweep.sh wandb:ENTITY/PROJECT/SWEEP_ID
#
# SWEEP.yaml (wandb's sweep format, configs/sweeps/) needs no wandb server: task i trains the
# sweep's i-th grid point or random draw (trainer/runs/sweep.py says how they are numbered) in
# RUNS_ROOT/<sweep name>/<i>-<description>, with wandb group = the sweep's name; the overrides
# apply to every task, the sweep's values win over them. A point out of range, an unknown key or
# a bad value ends the task with one line before any node starts. Every knob of slurm/train.sh
# works here (RUNS_ROOT, VENV, ENV_SETUP, GPUS_PER_NODE, MAX_RESTARTS, ...).
#
# wandb:ENTITY/PROJECT/SWEEP_ID (from `wandb sweep SWEEP.yaml`) runs one `wandb agent --count 1`
# per task, on one node: the sweep's `command` (accelerate launch, as in configs/sweeps/) starts
# the run, in RUNS_ROOT/<sweep id>/<run id>. On USR1 the trainers checkpoint and tell wandb the
# run is preempting; wandb hands that run to the next agent that asks, and this task requeues
# itself so that there is one: the run continues from its checkpoint, in the same wandb run.
#
#SBATCH --job-name=se-densenet-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -uo pipefail

usage="usage: sbatch --array=0-N slurm/sweep.sh SWEEP.yaml CONFIG [section.key=value ...] | wandb:ENTITY/PROJECT/SWEEP_ID"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
JOB=${SLURM_JOB_ID:?not inside a Slurm job — $usage}
TASK=${SLURM_ARRAY_TASK_ID:?not an array task — submit with sbatch --array=0-N (python -m trainer.sweep lists N)}

# sbatch runs a copy of this script from the spool: slurm/env.sh is found through REPO, the submitted path or dir
job_script=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p') || true
for env_sh in ${REPO:+"$REPO/slurm/env.sh"} "${job_script%/*}/env.sh" "${SLURM_SUBMIT_DIR:-.}/slurm/env.sh" ""; do
  [ -f "$env_sh" ] && break
done
source "${env_sh:?cannot find the checkout (slurm/env.sh): set REPO=/path/to/it}"  # REPO, ENV_SETUP, VENV, PYTHONPATH

if [[ $1 != wandb:* ]]; then
  [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
  SWEEP=$1 CONFIG=$2
  shift 2
  # The task's point, run.dir and wandb.group, one word per line; a problem is one line on stderr.
  mapfile -t words < <(python -m trainer.sweep --task "$TASK" "$SWEEP" "$CONFIG" "$@"; echo "rc=$?")
  [ "${words[-1]}" = rc=0 ] || exit 2
  unset 'words[-1]'
  echo "== $(date '+%F %T') sweep $SWEEP task $TASK of array ${SLURM_ARRAY_JOB_ID:-?}: ${words[*]}"
  exec bash "$REPO/slurm/train.sh" "$CONFIG" "$@" "${words[@]}"
fi

SWEEP_PATH=${1#wandb:}
[ $# -eq 1 ] || { echo "the wandb: form takes no config or overrides: the sweep's command has them" >&2; exit 2; }
[ "${SLURM_JOB_NUM_NODES:-1}" = 1 ] || {
  echo "the wandb: form runs one node per task (the agent starts the sweep's command on it): drop --nodes, or use SWEEP.yaml" >&2
  exit 2
}
command -v wandb >/dev/null || { echo "wandb is not on PATH: set VENV or ENV_SETUP" >&2; exit 2; }
RUNS=$(realpath -m "${RUNS_ROOT:-runs}")
export RUNS_ROOT=$RUNS  # where the trainer puts RUNS_ROOT/<sweep id>/<run id>
RESTARTS=${SLURM_RESTART_COUNT:-0}
MAX_RESTARTS=${MAX_RESTARTS:-20}
echo "== $(date '+%F %T') job $JOB SLURM_RESTART_COUNT=$RESTARTS: wandb agent --count 1 $SWEEP_PATH"

# The agent writes wandb/sweep-<id>/config-<run id>.yaml under WANDB_DIR: which run this task got.
AGENT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/sweep-agent-$JOB.XXXXXX") || exit 1
trap 'rm -rf "$AGENT_DIR"' EXIT
export WANDB_DIR=$AGENT_DIR  # the agent's own files; the run's go to its run dir

warned=0 termed=0 agent="" reminder=""
remind() {  # the trainers: the children of the agent's children (the sweep command's `accelerate launch`);
  # again every 15 s, for a run the agent has not started yet or a trainer still without its handler
  local launcher
  while kill -0 "$agent" 2>/dev/null; do
    for launcher in $(pgrep -P "$agent"); do pkill -USR1 -P "$launcher"; done
    sleep 15
  done
}
on_usr1() {
  [ "$warned" = 1 ] && return
  warned=1
  echo "== $(date '+%F %T') USR1: the time limit is near, asking the trainers to checkpoint"
  [ -n "$agent" ] && { remind & reminder=$!; }
}
on_term() { termed=1; echo "== $(date '+%F %T') SIGTERM: the job is being ended, not requeueing"; }
trap on_usr1 USR1
trap on_term TERM

# The agent, the launcher and wandb's service inherit USR1 ignored; only the trainers, which
# install a handler for it, act on it (the launcher would die of it, orphaning them).
(trap '' USR1; exec wandb agent --count 1 "$SWEEP_PATH") &
agent=$!
[ "$warned" = 1 ] && { remind & reminder=$!; }  # the warning came before the agent started
while :; do  # `wait` returns early whenever a trap ran
  wait "$agent"; rc=$?
  kill -0 "$agent" 2>/dev/null || break
done
[ -n "$reminder" ] && kill "$reminder" 2>/dev/null

run_id=$(find "$AGENT_DIR" -name 'config-*.yaml' -printf '%f\n' 2>/dev/null | sed -n 's/^config-\(.*\)\.yaml$/\1/p' | tail -n 1)
status="$RUNS/${SWEEP_PATH##*/}/$run_id/status.json"
state=none
if [ -n "$run_id" ] && [ -f "$status" ]; then
  state=$(sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p' "$status")
fi
if [ "$state" = preempted ] && [ "$termed" = 0 ] && [ "$RESTARTS" -lt "$MAX_RESTARTS" ]; then
  echo "== $(date '+%F %T') run $run_id checkpointed and marked preempting: requeueing job $JOB, whose agent asks" \
    "wandb for the next run (restart $((RESTARTS + 1)) of at most $MAX_RESTARTS)"
  scontrol requeue "$JOB" || { echo "== scontrol requeue failed: start another agent for sweep $SWEEP_PATH"; exit 75; }
  exit 0
fi
echo "== $(date '+%F %T') wandb agent ended (exit $rc${run_id:+, run $run_id: $state})"
[ "$state" = preempted ] && exit 75
exit "$rc"
