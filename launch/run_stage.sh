#!/usr/bin/env bash
# Start a tristage stage on this machine or a cluster.
#
#   launch/run_stage.sh sft|rm|ppo|dpo|eval|all|collect|score|export|demo|reward-server [--config FILE] [--dry-run] [key=value ...]
#   launch/run_stage.sh sft|rm|ppo|dpo --estimate [--config FILE] [key=value ...]   per-GPU memory, from config.json only
#   launch/run_stage.sh sft|rm|ppo|eval --print-command [...]                   print the command it would run, and exit
#
# With no --config, a stage runs its configs/demo/ default (and the demo's base model and data are built
# first, with no download). The launcher is picked from the hardware:
#   GPUs + a DeepSpeed config (deepspeed=...)  one node: the `deepspeed` launcher; with HOSTFILE: `deepspeed
#                                              --hostfile` (it starts the other nodes over ssh); NNODES > 1 without
#                                              HOSTFILE: `torchrun` on each node (no ssh: Slurm, Kubernetes)
#   GPUs without one, or CPU with NPROC > 1    torchrun (gloo on CPU): data parallel, every process holds the model
#   otherwise                                  one plain process
# Environment: NUM_GPUS (GPUs per node; default: the entries of CUDA_VISIBLE_DEVICES, else what nvidia-smi lists),
# NPROC (processes per node; default NUM_GPUS, or 1 without GPUs), NNODES and NODE_RANK (default
# SLURM_NNODES / SLURM_NODEID under Slurm, else 1 and 0), MASTER_ADDR (default the first host of SLURM_JOB_NODELIST,
# else 127.0.0.1), MASTER_PORT (29500), HOSTFILE, DEMO_DIR (runs/demo); --estimate also GPU_MEMORY_GIB.
# CUDA_VISIBLE_DEVICES limits the GPUs, as for any CUDA program (passed to deepspeed as --include localhost:<ids>).
# The log is tee'd into <output_dir>/logs/; the exit code is the stage's (2 = bad config or data).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

STAGE="${1:-}"
[ -n "$STAGE" ] || { usage; exit 2; }
shift
case "$STAGE" in
  sft|rm|ppo|dpo|eval) ;;
  score) exec "$PYTHON" -m stages.cli score "$@" ;;
  export) exec "$PYTHON" -m stages.cli export "$@" ;;
  reward-server) exec "$PYTHON" -m stages.cli reward-server "$@" ;;
  all) exec "$PYTHON" -m stages.cli all "$@" ;;
  collect) exec "$PYTHON" -m stages.cli collect "$@" ;;
  demo) exec "$PYTHON" -m stages.cli demo --out "${DEMO_DIR:-runs/demo}" "$@" ;;
  -h|--help|help) usage; exit 0 ;;
  *) echo "run_stage.sh: unknown stage '$STAGE' (sft, rm, ppo, dpo, eval, all, collect, score, export, demo, reward-server)" >&2; exit 2 ;;
esac

CONFIG=""
ARGS=()
DRY_RUN=0
ESTIMATE=0
PRINT_COMMAND=0
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="${2:-}"; shift 2 ;;
    --config=*) CONFIG="${1#--config=}"; shift ;;
    --dry-run) ARGS+=("dry_run=true"); DRY_RUN=1; shift ;;
    --estimate) ESTIMATE=1; shift ;;
    --print-command) PRINT_COMMAND=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [ -z "$CONFIG" ]; then
  CONFIG="$ROOT/configs/demo/$STAGE.yaml"
fi
[ -f "$CONFIG" ] || { echo "run_stage.sh: config file '$CONFIG' does not exist" >&2; exit 2; }
if [ "$DRY_RUN" = 1 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  ARGS+=("use_cpu=true")  # a bf16 GPU recipe still parses on a CPU login node; nothing trains
fi
if [ "$ESTIMATE" = 1 ]; then  # reads the configs only: no data, no weights, no launcher
  exec "$PYTHON" -m stages.cli estimate "$STAGE" --config "$CONFIG" "${ARGS[@]}"
fi

# The demo configs read runs/demo/{base,data}: build them once (seconds, no download).
if [ "$PRINT_COMMAND" = 0 ]; then
  case "$(cd "$(dirname "$CONFIG")" && pwd)" in
    "$ROOT/configs/demo") "$PYTHON" -m stages.cli demo --out "${DEMO_DIR:-runs/demo}" || exit $? ;;
  esac
fi

# Where the output goes (and whether DeepSpeed is configured), as the stage itself will read them.
RESOLVED="$("$PYTHON" -m stages.cli launch-keys "$STAGE" --config "$CONFIG" "${ARGS[@]}")" || exit $?
OUTPUT_DIR="$(sed -n 1p <<<"$RESOLVED")"
DS_CONFIG="$(sed -n 2p <<<"$RESOLVED")"
[ "$DS_CONFIG" = "None" ] && DS_CONFIG=""

# GPUs on this node. CUDA_VISIBLE_DEVICES is the user's choice of GPUs: count (and later pass on) its entries.
GPU_MASK=""
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ] && [ "${CUDA_VISIBLE_DEVICES}" != "-1" ]; then
  GPU_MASK="${CUDA_VISIBLE_DEVICES// /}"
fi
if [ -z "${NUM_GPUS:-}" ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    NUM_GPUS=0
    [ -n "$GPU_MASK" ] && NUM_GPUS="$(tr ',' '\n' <<<"$GPU_MASK" | grep -c .)"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    NUM_GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
  else
    NUM_GPUS=0
  fi
fi
# Under Slurm (srun starts this script once per node) the node count, this node's rank and the first node come
# from Slurm unless set.
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
# One process per GPU: under DeepSpeed, or data parallel without it (every GPU holds the model; gradients are averaged).
if [ "$NUM_GPUS" -gt 0 ]; then NPROC="${NPROC:-$NUM_GPUS}"; else NPROC="${NPROC:-1}"; fi
if [ "$STAGE" = "eval" ] || [ "$DRY_RUN" = 1 ]; then NPROC=1; NNODES=1; NUM_GPUS=0; fi  # one plain process

TORCHRUN=(torchrun --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK"
          --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m stages.cli "$STAGE")
STAGE_ARGS=(--config "$CONFIG" "${ARGS[@]}")
if [ "$NUM_GPUS" -gt 0 ] && [ -n "$DS_CONFIG" ] && [ -n "${HOSTFILE:-}" ]; then
  # this node starts every host of the file over ssh (pdsh); the file's slots say how many GPUs each has
  LAUNCH=(deepspeed --no_local_rank --hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$NPROC"
          --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module stages.cli "$STAGE")
elif [ "$NUM_GPUS" -gt 0 ] && [ -n "$DS_CONFIG" ] && [ "$NNODES" -eq 1 ]; then
  LAUNCH=(deepspeed --no_local_rank --master_port "$MASTER_PORT")
  if [ -n "$GPU_MASK" ] && [[ "$GPU_MASK" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    # the deepspeed launcher sets CUDA_VISIBLE_DEVICES itself: name the allowed GPUs, or it takes GPUs 0..N-1
    LAUNCH+=(--include "localhost:$(tr ',' '\n' <<<"$GPU_MASK" | head -n "$NPROC" | paste -sd, -)")
  elif [ -n "$GPU_MASK" ]; then
    LAUNCH=("${TORCHRUN[@]}")  # GPU UUIDs or MIG devices: torchrun keeps CUDA_VISIBLE_DEVICES as it is
  else
    LAUNCH+=(--num_gpus "$NPROC")
  fi
  [ "${LAUNCH[0]}" = deepspeed ] && LAUNCH+=(--module stages.cli "$STAGE")
elif [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
  # several nodes without ssh (every node runs this script with its NODE_RANK), or several CPU processes
  LAUNCH=("${TORCHRUN[@]}")
else
  LAUNCH=("$PYTHON" -m stages.cli "$STAGE")
fi

if [ "$PRINT_COMMAND" = 1 ]; then  # what would run, quoted only where a shell needs it
  WORDS=()
  for word in "${LAUNCH[@]}" "${STAGE_ARGS[@]}"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@+-]+$ ]]; then WORDS+=("$word"); else WORDS+=("$(printf '%q' "$word")"); fi
  done
  echo "${WORDS[*]}"
  exit 0
fi

mkdir -p "$OUTPUT_DIR/logs"
LOG="$OUTPUT_DIR/logs/$STAGE-$(date +%Y%m%d-%H%M%S)-node$NODE_RANK.log"
echo "run_stage.sh: ${LAUNCH[*]} ${STAGE_ARGS[*]}" | tee -a "$LOG"
"${LAUNCH[@]}" "${STAGE_ARGS[@]}" 2>&1 | tee -a "$LOG"
STATUS=${PIPESTATUS[0]}
if [ "$STATUS" -ne 0 ]; then
  echo "run_stage.sh: stage $STAGE failed with exit code $STATUS (log: $LOG)" >&2
fi
exit "$STATUS"
