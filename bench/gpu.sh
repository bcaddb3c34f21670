#!/usr/bin/env bash
# Every GPU measurement BENCHMARKS.md asks for, in one call of <= 8 minutes, compile included.
#
#   bash bench/gpu.sh                  # on the GPU machine, from the repo root (python3 there holds torch)
#   bash bench/gpu.sh --parts e2e,cand # only some parts (a rerun of what did not fit or broke)
#   bash bench/gpu.sh --smoke          # the same steps on a CPU with tiny sizes (~1-2 min); the tests run it
#
# Writes gpu-bench.json, gpu-bench.md and gpu-bench-logs.txt under $OUT when set, else under
# bench-work/ (scratch: shards, compile caches, run dirs and step logs stay in bench-work/).
#
# Plan (each step under `timeout`; a step that fails or times out is recorded and the next one runs):
#   prep     carried wheels (.whl/, from bench/gpu_wheels.sh) -> pip --target a temp dir on
#            PYTHONPATH (the image's torch untouched); versions; synthetic JPEG shards
#   loaders  bench.train --no-end-to-end: the train loader alone, decode=workers|device x
#            15|4 workers, and its model-only step (trainer config, eager), on a quiet CPU
#   compile  phase A, in parallel: one bench.model process per compiled setting (1 step) and the
#            real trainer, all with cold caches: each one's cold time to the first step, and the
#            warm caches phase B starts from. Lower priorities run under nice. All killed at the
#            phase deadline (--compile-s).
#   phase B, one at a time (timed alone), highest priority first, each skipped when its phase-A
#   compile did not finish or the budget is spent:
#     model  bench.model reduce-overhead at batch 128: tv, ours-se, ours-se-eff (--max-batch);
#            starts as soon as its three compiles are done
#     e2e    `accelerate launch trainer/main.py` (1 epoch) on the warm cache: end to end, warm start
#     cand   ours-se-sharedbn, cand-se-sumfc at batch 128 (against ours-se of `model`)
#     b256   tv, ours-se at batch 256
#     eager  tv, ours-se, ours-se-eff eager at batch 128 (no compile)
#     ramp   bench.resize: the trainer eager, 3 epochs at a fixed 224 px, then 160 -> 224 (progressive
#            resizing): train seconds per epoch and their ratio; runs only on what the budget has left
#   report   bench.gpu_report merges everything into one JSON and Markdown tables with the targets.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
SMOKE=0
PARTS=all
usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --parts) PARTS=$2; shift ;;
    --parts=*) PARTS=${1#--parts=} ;;
    --budget) GPU_BENCH_BUDGET=$2; shift ;;
    --compile-s) GPU_BENCH_COMPILE_S=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
ALL_PARTS="loaders model e2e cand b256 eager ramp"
[ "$PARTS" = all ] && PARTS=${ALL_PARTS// /,}
for p in ${PARTS//,/ }; do
  case " $ALL_PARTS " in *" $p "*) ;; *) echo "bench/gpu.sh: unknown part $p (choose from $ALL_PARTS)" >&2; exit 2 ;; esac
done
want() { case ",$PARTS," in *",$1,"*) return 0 ;; esac; return 1; }

# ------------------------------------------------------------------------------------ settings
if [ $SMOKE = 1 ]; then  # tiny sizes, CPU, no compile: the same steps, in about a minute
  BUDGET=${GPU_BENCH_BUDGET:-300}; COMPILE_S=${GPU_BENCH_COMPILE_S:-120}; RESERVE=10  # caps, for a loaded machine
  WORK=${GPU_BENCH_WORK:-$REPO/bench-work/smoke}
  COLD_STEPS=1; B1=2; B2=4; COMPILE=${GPU_BENCH_SMOKE_COMPILE:-none}; DEVICE=cpu; WORKERS=2,1; W=2; IMAGES=200; CLASSES=10; VAL=0.1; LSTEPS=2
  MODEL_ARGS=(--device cpu --size 32 --warmup 1 --steps 1)
  # bench.model through a shim whose CPU memory column is skipped: MemTracker's peak of one
  # DenseNet-121 step takes 20-40 s on 2 cores, the rest of a variant about one.
  MODEL=($PY -c 'import sys
import bench.model as m
m.peak_bytes = lambda *args: 2**20  # 1 MiB: not measured
if sys.argv[1] == "--no-check":  # phase A: the float64 candidate check runs once, in phase B
    m.check_candidates = lambda names: None
    del sys.argv[1]
sys.argv = ["bench.model", *sys.argv[1:]]
m.main()'); NOCHECK=(--no-check)
  TRAIN_ARGS=(model.block_config=[2,2] data.image_size=64 train.batch_size=16 data.workers=$W
              train.mixed_precision=no train.channels_last=false train.log_every=2)
  RAMP=(--min-size 32 --size 64)
  export ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=
else
  BUDGET=${GPU_BENCH_BUDGET:-465}; COMPILE_S=${GPU_BENCH_COMPILE_S:-240}; RESERVE=15
  WORK=${GPU_BENCH_WORK:-$REPO/bench-work}
  COLD_STEPS=2; B1=128; B2=256; COMPILE=reduce-overhead; DEVICE=cuda; WORKERS=15,4; W=15; IMAGES=12000; CLASSES=100; VAL=0.01; LSTEPS=60
  MODEL_ARGS=()
  MODEL=($PY -m bench.model); NOCHECK=()
  TRAIN_ARGS=(data.workers=$W train.log_every=10)
  RAMP=(--min-size 160 --size 224)
fi
CONFIG=configs/densenet121-imagenet.yaml
THREADS=${GPU_BENCH_COMPILE_THREADS:-4}  # inductor compile workers per phase-A process (several compile at once)
OUTDIR=${OUT:-$WORK}
mkdir -p "$WORK" "$OUTDIR" || exit 1
RES=$(mktemp -d "$WORK/run-XXXXXX") || exit 1  # this run's JSONs and logs (concurrent runs do not mix)
mkdir -p "$RES/logs"
STEPS=$RES/steps.jsonl
: >"$STEPS"
CACHE=$WORK/inductor  # bench.model's compile cache, shared by phase A and B
RUN=$RES/e2e-run      # the trainer's run dir: its own compile cache (run.dir/compile_cache), cold at first
SHARDS=$WORK/shards-$IMAGES-c$CLASSES-val$VAL
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_SILENT=true

now_ms() { date +%s%3N; }
T0=$(now_ms)
elapsed() { echo $(( ($(now_ms) - T0) / 1000 )); }
left() { echo $(( BUDGET - $(elapsed) )); }
say() { echo "[gpu.sh $(elapsed)s] $*"; }

# record NAME STATUS RC SECONDS NOTE
record() {
  printf '{"name": "%s", "status": "%s", "rc": %s, "seconds": %s, "started_s": %s, "concurrent": %s, "note": "%s"}\n' \
    "$1" "$2" "${3:-null}" "${4:-0}" "${5:-null}" "${6:-0}" "$7" >>"$STEPS"
}
status_of() { grep "\"name\": \"$1\"" "$STEPS" | tail -1 | sed 's/.*"status": "\([a-z]*\)".*/\1/'; }

# run_step NAME CAP MIN CMD... : at most CAP seconds (less if the budget has less), skipped if
# fewer than MIN seconds are left. The log goes to $RES/logs/NAME.log.
run_step() {
  local name=$1 cap=$2 min=$3; shift 3
  local avail=$(( $(left) - RESERVE ))
  if [ "$avail" -lt "$min" ]; then
    say "skip $name: ${avail}s left in the budget, it needs ${min}s"
    record "$name" skipped null 0 "$(elapsed)" 0 "budget: ${avail}s left, needs ${min}s"
    return 1
  fi
  local t=$(( cap < avail ? cap : avail )) start=$(now_ms) started=$(elapsed) busy
  busy=$(jobs -rp | wc -l)
  say "$name (timeout ${t}s$([ "$busy" -gt 0 ] && echo ", $busy jobs running")): $*"
  timeout -k 10 "$t" "$@" >"$RES/logs/$name.log" 2>&1
  local rc=$? secs status note=""
  secs=$(( ($(now_ms) - start) / 1000 ))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; note="stopped after ${t}s" ;;
    *) status=failed; note="exit $rc: $(grep -v '^\s*$' "$RES/logs/$name.log" | tail -1 | tr -d '\\"' | tr -c '[:print:]' ' ' | cut -c1-200)" ;;
  esac
  say "$name: $status in ${secs}s ${note}"
  record "$name" "$status" "$rc" "$secs" "$started" "$busy" "$note"
  [ $status = ok ]
}

skip() { say "skip $1: $2"; record "$1" skipped null 0 "$(elapsed)" 0 "$2"; }
deps_ok() { local d; for d in "$@"; do [ "$(status_of "$d")" = ok ] || return 1; done; }

declare -A PID=()
# start_job NAME NICE CAP MIN CMD... : run_step in the background
start_job() {
  local name=$1 niceness=$2; shift 2
  local cap=$1 min=$2; shift 2
  run_step "$name" "$cap" "$min" nice -n "$niceness" "$@" &
  PID[$name]=$!
}
wait_jobs() { local n; for n in "$@"; do [ -n "${PID[$n]:-}" ] && wait "${PID[$n]}" 2>/dev/null; done; return 0; }

# the real trainer, 1 process, as bench.train's end-to-end run starts it; run.dir keeps its compile cache
TRAINER=($PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
  trainer/main.py --config $CONFIG "data.shards=$SHARDS" "run.dir=$RUN" train.epochs=1 train.resume=false
  wandb.mode=disabled train.device=$DEVICE train.compile=$COMPILE "${TRAIN_ARGS[@]}")
# e2e NAME NICE CAP: the trainer; its metrics.jsonl kept as $RES/NAME-metrics.jsonl
e2e() {
  run_step "$1" "$3" 20 nice -n "$2" env -u TORCHINDUCTOR_CACHE_DIR TORCHINDUCTOR_COMPILE_THREADS=$THREADS "${TRAINER[@]}"
  local rc=$?
  cp "$RUN/metrics.jsonl" "$RES/$1-metrics.jsonl" 2>/dev/null
  return $rc
}

say "mode $([ $SMOKE = 1 ] && echo smoke || echo gpu), parts $PARTS, budget ${BUDGET}s, compile phase ${COMPILE_S}s, work $WORK"

# ------------------------------------------------------------------------------------ prep
if [ $SMOKE = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d /tmp/gpu-bench-site-XXXXXX)
  run_step wheels 60 5 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
[ $SMOKE = 0 ] && ! ls .whl/*.whl >/dev/null 2>&1 && say "no .whl/ (bash bench/gpu_wheels.sh here, then carry .whl): omegaconf must already be importable"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

# preflight runs beside the shards and ends before anything is timed: versions from package
# metadata and nvidia-smi (no torch import); on the GPU it also imports what every step imports.
run_step preflight 60 5 $PY - "$RES/env.json" $SMOKE <<'EOF' &
import json, os, platform, subprocess, sys, time
from importlib import metadata
env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
       "host_cpus": os.cpu_count(), "platform": platform.platform()}
try:
    env["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
except (ValueError, OSError):
    pass
for name in ("torch", "torchvision", "triton", "accelerate", "timm", "numpy", "pillow", "omegaconf", "webdataset", "wandb"):
    try:
        env[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        env[name] = "missing"
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""
gpu = run("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits") if sys.argv[2] == "0" else ""
if gpu:
    name, mem, driver = [x.strip() for x in gpu.splitlines()[0].split(",")]
    env.update(device=name, gpu_mem_gib=round(float(mem) / 1024, 1), driver=driver)
else:
    env["device"] = "cpu"
env["commit"] = run("git", "rev-parse", "--short", "HEAD") or "?"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env), flush=True)
if sys.argv[2] == "0":
    import torch, trainer.main, trainer.training.model  # noqa: E401,F401 -- fail here, once, if they cannot
    print("cuda:", torch.cuda.is_available(), torch.version.cuda)
EOF
PREFLIGHT=$!

if want loaders || want e2e || want ramp; then  # bench.train's synthetic_shards, with a val split (the trainer needs one)
  run_step shards 240 20 $PY - "$SHARDS" "$IMAGES" "$VAL" "$CLASSES" <<'EOF'
import subprocess, sys
from pathlib import Path
from bench import make_shards
out, n, val, classes = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if not (out / "manifest.json").exists():
    make_shards.CLASSES = classes  # 100 unless the smoke run asks for fewer (a quicker confusion plot)
    src = make_shards.make_corpus(out.parent / f"{out.name}-src", n, unique=min(n, 2000))
    subprocess.run([sys.executable, "-m", "launch.make_shards", str(src), str(out), "--overwrite", "--val-fraction", val], check=True)
print(out)
EOF
fi

wait $PREFLIGHT

# ------------------------------------------------------------------------------------ loaders (quiet CPU)
if want loaders; then
  if deps_ok shards; then
    run_step loaders 150 30 $PY -m bench.train --shards "$SHARDS" --work "$RES/train" --no-end-to-end --device $DEVICE \
      --loader-workers $WORKERS --steps $LSTEPS --json "$RES/loaders.json" --config $CONFIG \
      "${TRAIN_ARGS[@]}" train.compile=none
  else
    skip loaders "no shards"
  fi
fi

# ------------------------------------------------------------------------------------ phase A: cold compiles, in parallel
COLD_START=$(elapsed)
[ -n "$(ls -A "$CACHE" 2>/dev/null)" ] && CACHE_STATE=reused || CACHE_STATE=cold
mkdir -p "$CACHE"
echo "{\"model_cache\": \"$CACHE_STATE\", \"compile_threads\": $THREADS}" >"$RES/cache.json"
A_END=$(( COLD_START + COMPILE_S ))
cap_a() { echo $(( A_END - $(elapsed) )); }
declare -A COLD=()  # part -> the phase-A jobs its phase-B step needs
# cold BATCH NICE PART:VARIANT...: on the GPU one process per variant (they compile in parallel,
# lower priorities niced); in the smoke run one process per batch (2 cores: fewer torch imports)
cold() {
  local batch=$1 niceness=$2 item g name; shift 2
  local groups=()
  if [ $SMOKE = 1 ]; then
    groups=("$(IFS=,; echo "$*")"); niceness=0
  else
    groups=("$@")
  fi
  for g in "${groups[@]}"; do
    local variants parts=()
    variants=$(echo "$g" | sed 's/[a-z0-9]*://g')
    name=cold-b$batch-${variants//,/+}
    start_job "$name" "$niceness" "$(cap_a)" 20 env TORCHINDUCTOR_CACHE_DIR="$CACHE" TORCHINDUCTOR_COMPILE_THREADS=$THREADS \
      "${MODEL[@]}" "${NOCHECK[@]}" "${MODEL_ARGS[@]}" --compile $COMPILE --batch "$batch" --variants "$variants" \
      --warmup 1 --steps $COLD_STEPS --json "$RES/$name.json"
    for item in ${g//,/ }; do
      COLD[${item%%:*}]="${COLD[${item%%:*}]:-} $name"
    done
  done
}
if want e2e; then
  if deps_ok shards; then
    rm -rf "$RUN"
    e2e e2e-cold 0 "$(cap_a)" &
    PID[e2e-cold]=$!
  else
    skip e2e-cold "no shards"
  fi
fi
M=(); L=(); H=()  # model (first), cand, b256 (niced on the GPU)
want model && M=(model:tv model:ours-se model:ours-se-eff)
want cand && L=(cand:ours-se-sharedbn cand:cand-se-sumfc)
want b256 && H=(b256:tv b256:ours-se)
if [ $SMOKE = 1 ]; then
  [ ${#M[@]} -gt 0 ] || [ ${#L[@]} -gt 0 ] && cold $B1 0 "${M[@]}" "${L[@]}"
  [ ${#H[@]} -gt 0 ] && cold $B2 0 "${H[@]}"
else
  [ ${#M[@]} -gt 0 ] && cold $B1 0 "${M[@]}"
  [ ${#L[@]} -gt 0 ] && cold $B1 10 "${L[@]}"
  [ ${#H[@]} -gt 0 ] && cold $B2 15 "${H[@]}"
fi

# ------------------------------------------------------------------------------------ phase B: timed alone
# model: CUDA graphs replay with little CPU, so it starts as soon as its own compiles are done
# (other phase-A compiles may still run, niced: the row records how many jobs were running).
if want model; then
  wait_jobs ${COLD[model]}
  if deps_ok ${COLD[model]}; then
    run_step model-b$B1 150 40 env TORCHINDUCTOR_CACHE_DIR="$CACHE" \
      "${MODEL[@]}" "${MODEL_ARGS[@]}" --compile $COMPILE --batch $B1 --variants tv,ours-se,ours-se-eff \
      --max-batch --json "$RES/model-b$B1.json"
  else
    skip model-b$B1 "a phase-A compile did not finish"
  fi
fi
wait_jobs "${!PID[@]}"  # the rest is CPU-sensitive or needs its compile: all of phase A ends first
say "phase A over"

if want e2e; then
  if grep -q startup_s "$RES/e2e-cold-metrics.jsonl" 2>/dev/null; then  # the cold run compiled and trained
    e2e e2e-warm 0 150
  else
    skip e2e-warm "the cold trainer run did not reach its first logged window"
  fi
fi
if want cand; then
  if deps_ok ${COLD[cand]}; then
    run_step model-cand 120 40 env TORCHINDUCTOR_CACHE_DIR="$CACHE" \
      "${MODEL[@]}" "${MODEL_ARGS[@]}" --compile $COMPILE --batch $B1 --variants ours-se-sharedbn,cand-se-sumfc \
      --max-batch --json "$RES/model-cand.json"
  else
    skip model-cand "a phase-A compile did not finish"
  fi
fi
if want b256; then
  if deps_ok ${COLD[b256]}; then
    run_step model-b$B2 120 40 env TORCHINDUCTOR_CACHE_DIR="$CACHE" \
      "${MODEL[@]}" "${MODEL_ARGS[@]}" --compile $COMPILE --batch $B2 --variants tv,ours-se \
      --max-batch --json "$RES/model-b$B2.json"
  else
    skip model-b$B2 "a phase-A compile did not finish"
  fi
fi
if want eager; then
  run_step model-eager 90 25 "${MODEL[@]}" "${MODEL_ARGS[@]}" --compile none --batch $B1 \
    --variants tv,ours-se,ours-se-eff --json "$RES/model-eager.json"
fi
if want ramp; then
  if deps_ok shards; then
    run_step ramp 150 60 $PY -m bench.resize --device $DEVICE --shards "$SHARDS" --work "$RES/resize" --epochs 3 \
      "${RAMP[@]}" --workers $W --config $CONFIG --json "$RES/ramp.json" "${TRAIN_ARGS[@]}" train.compile=none
  else
    skip ramp "no shards"
  fi
fi

# ------------------------------------------------------------------------------------ report
rm -rf "$RUN"/checkpoints* "$RES"/resize/*/checkpoints  # the trainers' checkpoints: nothing reads them
say "report"
timeout 60 $PY -m bench.gpu_report --res "$RES" --out "$OUTDIR" --batches $B1,$B2 --compile $COMPILE \
  --workers $WORKERS --parts "$PARTS" $([ $SMOKE = 1 ] && echo --smoke) --budget "$BUDGET" --elapsed "$(elapsed)" \
  --command "bash bench/gpu.sh$([ $SMOKE = 1 ] && echo ' --smoke')$([ "$PARTS" != "${ALL_PARTS// /,}" ] && echo " --parts $PARTS")"
rc=$?
{ for f in "$RES"/logs/*.log; do echo "===== $(basename "$f") (last 40 lines)"; tail -n 40 "$f"; done; } >"$OUTDIR/gpu-bench-logs.txt"
say "done in $(elapsed)s: $OUTDIR/gpu-bench.json, gpu-bench.md, gpu-bench-logs.txt (work: $RES)"
exit $rc
