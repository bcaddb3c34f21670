#!/bin/bash
# Train on N nodes x G GPUs: one srun task per node runs `accelerate launch` (slurm/node.sh).
#
#   sbatch [--nodes 4 --gpus-per-node 8 --cpus-per-task 32 --partition gpu --time 1-00:00:00] \
#       slurm/train.sh configs/X.yaml [section.key=value | --section.key=value | --section.key value ...]
#
# Knobs. sbatch flags override the #SBATCH lines below (so do SBATCH_PARTITION, SBATCH_TIMELIMIT,
# SBATCH_GPUS_PER_NODE, SBATCH_SIGNAL, ...); these environment variables, set when you submit, are
# passed to the job (sbatch exports the submitting environment):
#   VENV                virtualenv to activate (default: the repo's .venv; empty: use PATH as it is)
#   ENV_SETUP           shell code run first, e.g. "module load cuda/12.4; conda activate sed"
#   GPUS_PER_NODE       processes per GPU node (default: the GPUs Slurm gave the job per node)
#   CPU_PROCS_PER_NODE  processes per node when the nodes have no GPU: the CPU (gloo) path (default 1)
#   MAIN_PORT           rendezvous port on the first node (default: 10000 + job id % 20000)
#   ACCELERATE_ARGS     extra `accelerate launch` arguments (default none), e.g. "--mixed_precision bf16";
#                       precision and compile: the config's train.mixed_precision / train.compile when
#                       set, else these arguments, else `accelerate config`'s file, else no / none
#   RUNS_ROOT           where the run directory goes (default: runs, under the submit directory)
#   RUN_DIR             the run directory (default: RUNS_ROOT/<config name>-<job id>; run.dir=... too)
#   MAX_RESTARTS        requeues allowed after preemption (default 20), counted by SLURM_RESTART_COUNT
#   STEP_GRACE          seconds the other nodes get to finish once one node's launcher ended (120)
#   REPO                the checkout (default: found from the submitted script's path)
#
# Run and wandb: run.dir = RUNS_ROOT/<config name>-<job id>, wandb name = that directory's name,
# wandb group = <config name> unless the config sets one, wandb id derived from run.dir: a
# requeued job (same job id) resumes the same run and continues the same wandb run. To continue a
# run in a new job, pass its run.dir=... (or RUN_DIR).
#
# Preemption and time limits: Slurm sends USR1 to this shell 300 s before the limit (--signal); it
# is passed to every trainer, which checkpoints at the next step all ranks agree on, writes
# run.dir/status.json {"state": "preempted"} and exits. Then, and only then, the job requeues
# itself; the requeued job resumes from that checkpoint. A completed run or a failure does not
# requeue. Set the lead time to more than one step plus one checkpoint write.
#
#SBATCH --job-name=se-densenet
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

usage="usage: sbatch [sbatch options] slurm/train.sh [--config] configs/X.yaml [section.key=value ...]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
# Overrides pass through as given: section.key=value, --section.key=value or --section.key value
# (trainer.training.config.normalize_overrides reads all three, here and in every trainer).
case $1 in
  --config) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; CONFIG=$2; shift 2 ;;
  --config=*) CONFIG=${1#--config=}; shift ;;
  *) CONFIG=$1; shift ;;
esac
JOB=${SLURM_JOB_ID:?not inside a Slurm job — $usage}

# sbatch runs a copy of this script from the spool: slurm/env.sh is found through REPO, the submitted path or dir
job_script=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p') || true
for env_sh in ${REPO:+"$REPO/slurm/env.sh"} "${job_script%/*}/env.sh" "${SLURM_SUBMIT_DIR:-.}/slurm/env.sh" ""; do
  [ -f "$env_sh" ] && break
done
source "${env_sh:?cannot find the checkout (slurm/env.sh): set REPO=/path/to/it}"  # REPO, ENV_SETUP, VENV, PYTHONPATH

# Processes: nodes x GPUs per node; with no GPU, CPU processes over gloo.
NODES=${SLURM_JOB_NUM_NODES:-1}
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}
gpus=${gpus##*:}  # --gpus-per-node=a100:4 -> 4
if [ -z "$gpus" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
fi
if [ "${gpus:-0}" -gt 0 ] 2>/dev/null; then
  PER_NODE=$gpus DEVICE=gpu
else
  PER_NODE=${CPU_PROCS_PER_NODE:-1} DEVICE=cpu
  export ACCELERATE_USE_CPU=true
fi
threads=$(( ${SLURM_CPUS_PER_TASK:-1} / PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
PROCS=$((NODES * PER_NODE))
ACCELERATE_ARGS=${ACCELERATE_ARGS-}

# Rendezvous: the first node's address as Slurm knows it (its name may not resolve), a per-job port.
FIRST=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
ADDR=$(scontrol show node "$FIRST" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
ADDR=${ADDR:-$FIRST}
PORT=${MAIN_PORT:-$((10000 + JOB % 20000))}

# Run directory and wandb names: fixed by the job id, so a requeued job continues the same run.
name=${CONFIG##*/}; name=${name%.*}
derived=()
if [ -n "${RUN_DIR:-}" ]; then
  derived+=("run.dir=$RUN_DIR")
else
  derived+=("run.dir=$(realpath -m "${RUNS_ROOT:-runs}")/$name-$JOB")
fi
check='import sys
from trainer.training.config import ConfigError, load_config
try:
    c = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"error: {e}")
print(c.run.dir)
print(c.wandb.group or "")'
# The user's run.dir=... comes later and wins; a bad config stops here, before any node starts.
mapfile -t resolved < <(python -c "$check" "$CONFIG" "${derived[@]}" "$@"; echo "rc=$?")
[ "${resolved[-1]}" = rc=0 ] || { printf '%s\n' "${resolved[@]:0:${#resolved[@]}-1}" >&2; exit 2; }
RUN=$(realpath -m "${resolved[0]}")
derived[0]="run.dir=$RUN"
[ -n "${resolved[1]}" ] || derived+=("wandb.group=$name")

RESTARTS=${SLURM_RESTART_COUNT:-0}
MAX_RESTARTS=${MAX_RESTARTS:-20}
echo "== $(date '+%F %T') job $JOB SLURM_RESTART_COUNT=$RESTARTS: $NODES node(s) x $PER_NODE $DEVICE process(es)," \
  "main $ADDR:$PORT, run.dir=$RUN"

warned=0 termed=0 step="" reminder=""
remind() {  # a trainer still starting up has no handler yet and ignores USR1: say it again until the step ends
  while kill -0 "$step" 2>/dev/null; do kill -USR1 "$step" 2>/dev/null; sleep 15; done
}
on_usr1() {
  [ "$warned" = 1 ] && return
  warned=1
  echo "== $(date '+%F %T') USR1: the time limit is near, asking the trainers to checkpoint"
  [ -n "$step" ] && { remind & reminder=$!; }
}
# Slurm's SIGTERM (scancel, time limit, preemption) reaches the trainers itself; the shell must
# outlive it, or the job would end and kill them before their checkpoint is written.
on_term() { termed=1; echo "== $(date '+%F %T') SIGTERM: the job is being ended, not requeueing"; }
trap on_usr1 USR1
trap on_term TERM

started=$(date +%s)
# --cpus-per-task is passed on: srun does not inherit it from sbatch in every Slurm release.
# No --kill-on-bad-exit: a rank that exits after the preemption checkpoint makes its launcher exit
# 1, and the kill would cut short rank 0 writing status.json and closing wandb. Instead the other
# nodes get STEP_GRACE seconds after the first task ends (a crashed node does not hang the job).
srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=0 --wait="${STEP_GRACE:-120}" \
  ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
  bash "$REPO/slurm/node.sh" \
  $([ "$PROCS" -gt 1 ] && echo --multi_gpu) --num_processes "$PROCS" --num_machines "$NODES" \
  --main_process_ip "$ADDR" --main_process_port "$PORT" $ACCELERATE_ARGS \
  "$REPO/trainer/main.py" --config "$CONFIG" "${derived[@]}" "$@" &
step=$!
[ "$warned" = 1 ] && { remind & reminder=$!; }  # the warning came before the step started
while :; do  # `wait` returns early whenever a trap ran
  wait "$step"; rc=$?
  kill -0 "$step" 2>/dev/null || break
done
[ -n "$reminder" ] && kill "$reminder" 2>/dev/null

# status.json, written by the trainer during this attempt, says what happened (the launcher's
# exit code does not: any rank exiting non-zero makes it 1).
state=none
if [ -f "$RUN/status.json" ] && [ "$(stat -c %Y "$RUN/status.json")" -ge "$started" ]; then
  state=$(sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p' "$RUN/status.json")
fi
if [ "$state" = running ]; then  # killed without a word (SIGKILL, the OOM killer): say so for it
  printf '{"state": "failed", "time": %s, "reason": "the trainers ended without saying why (killed? srun exit %s)"}\n' \
    "$(date +%s)" "$rc" > "$RUN/status.json.tmp" && mv "$RUN/status.json.tmp" "$RUN/status.json"
  state=failed
fi
case $state in
  completed)
    echo "== $(date '+%F %T') run completed: $RUN"; exit 0 ;;
  preempted)
    if [ "$termed" = 1 ]; then
      echo "== checkpointed on SIGTERM; resubmit with run.dir=$RUN to continue"; exit 75
    elif [ "$RESTARTS" -ge "$MAX_RESTARTS" ]; then
      echo "== checkpointed, but not requeueing: $RESTARTS restarts reached MAX_RESTARTS=$MAX_RESTARTS;" \
        "resubmit with run.dir=$RUN to continue"
      exit 75
    fi
    echo "== $(date '+%F %T') checkpoint complete, requeueing job $JOB (restart $((RESTARTS + 1)) of at most $MAX_RESTARTS)"
    scontrol requeue "$JOB" || { echo "== scontrol requeue failed; resubmit with run.dir=$RUN to continue"; exit 75; }
    exit 0 ;;
  *)
    if [ "$termed" = 1 ]; then
      echo "== $(date '+%F %T') ended by SIGTERM (scancel, time limit or preemption), run state: $state;" \
        "not requeueing; resubmit with run.dir=$RUN to resume from its last checkpoint"
      exit $(( rc == 0 ? 1 : rc ))
    fi
    echo "== $(date '+%F %T') training failed (srun exit $rc, run state: $state): not requeueing;" \
      "see the errors above, then resubmit with run.dir=$RUN to resume from its last checkpoint"
    exit $(( rc == 0 ? 1 : rc )) ;;
esac
