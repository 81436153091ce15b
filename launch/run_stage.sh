#!/usr/bin/env bash
# Start a tristage stage on this machine or a cluster.
#
#   launch/run_stage.sh sft|rm|ppo|eval|all|collect|score|export|demo|reward-server [--config FILE] [--dry-run] [key=value ...]
#   launch/run_stage.sh sft|rm|ppo --estimate [--config FILE] [key=value ...]   per-GPU memory, from config.json only
#
# With no --config, a stage runs its configs/demo/ default (and the demo's base model and data are built
# first, with no download). The launcher is picked from the hardware:
#   GPUs + a DeepSpeed config (deepspeed=...)  -> the `deepspeed` launcher (HOSTFILE / NNODES for several nodes)
#   GPUs without one, or CPU with NPROC > 1    -> torchrun (gloo on CPU)
#   otherwise                                  -> one plain process
# Environment: NUM_GPUS (default: all visible), NPROC (processes per node; default NUM_GPUS or 1), NNODES,
# NODE_RANK, MASTER_ADDR, MASTER_PORT, HOSTFILE, DEMO_DIR (default runs/demo); --estimate also GPU_MEMORY_GIB.
# Several nodes: run this script on every node with the same NNODES / MASTER_ADDR / MASTER_PORT and that node's
# NODE_RANK (Slurm: launch/slurm_example.sbatch), or on GPUs give one node a HOSTFILE (launch/hostfile.example)
# and the deepspeed launcher starts the others over ssh.
# The log is tee'd into <output_dir>/logs/; the exit code is the stage's (2 = bad config or data).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

STAGE="${1:-}"
[ -n "$STAGE" ] || { usage; exit 2; }
shift
case "$STAGE" in
  sft|rm|ppo|eval) ;;
  score) exec "$PYTHON" -m stages.cli score "$@" ;;
  export) exec "$PYTHON" -m stages.cli export "$@" ;;
  reward-server) exec "$PYTHON" -m stages.cli reward-server "$@" ;;
  all) exec "$PYTHON" -m stages.cli all "$@" ;;
  collect) exec "$PYTHON" -m stages.cli collect "$@" ;;
  demo) exec "$PYTHON" -m stages.cli demo --out "${DEMO_DIR:-runs/demo}" "$@" ;;
  -h|--help|help) usage; exit 0 ;;
  *) echo "run_stage.sh: unknown stage '$STAGE' (sft, rm, ppo, eval, all, collect, score, export, demo, reward-server)" >&2; exit 2 ;;
esac

CONFIG=""
ARGS=()
DRY_RUN=0
ESTIMATE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="${2:-}"; shift 2 ;;
    --config=*) CONFIG="${1#--config=}"; shift ;;
    --dry-run) ARGS+=("dry_run=true"); DRY_RUN=1; shift ;;
    --estimate) ESTIMATE=1; shift ;;
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
case "$(cd "$(dirname "$CONFIG")" && pwd)" in
  "$ROOT/configs/demo") "$PYTHON" -m stages.cli demo --out "${DEMO_DIR:-runs/demo}" || exit $? ;;
esac

# Where the output goes (and whether DeepSpeed is configured), as the stage itself will read them.
RESOLVED="$("$PYTHON" -m stages.cli launch-keys "$STAGE" --config "$CONFIG" "${ARGS[@]}")" || exit $?
OUTPUT_DIR="$(sed -n 1p <<<"$RESOLVED")"
DS_CONFIG="$(sed -n 2p <<<"$RESOLVED")"
[ "$DS_CONFIG" = "None" ] && DS_CONFIG=""

if [ -z "${NUM_GPUS:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then NUM_GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"; else NUM_GPUS=0; fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ "$NUM_GPUS" -gt 0 ]; then NPROC="${NPROC:-$NUM_GPUS}"; else NPROC="${NPROC:-1}"; fi
if [ "$STAGE" = "eval" ] || [ "$DRY_RUN" = 1 ]; then NPROC=1; NNODES=1; NUM_GPUS=0; fi  # one plain process

STAGE_ARGS=(--config "$CONFIG" "${ARGS[@]}")
if [ "$NUM_GPUS" -gt 0 ] && [ -n "$DS_CONFIG" ]; then
  LAUNCH=(deepspeed --no_local_rank --num_gpus "$NPROC" --master_port "$MASTER_PORT")
  if [ -n "${HOSTFILE:-}" ]; then    # this node starts every host of the file over ssh (pdsh)
    LAUNCH+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES" --master_addr "$MASTER_ADDR")
  elif [ "$NNODES" -gt 1 ]; then     # every node runs this script itself (Slurm / a job scheduler): no ssh
    LAUNCH+=(--no_ssh --num_nodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
  fi
  LAUNCH+=(--module stages.cli "$STAGE")
elif [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
  LAUNCH=(torchrun --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK"
          --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m stages.cli "$STAGE")
else
  LAUNCH=("$PYTHON" -m stages.cli "$STAGE")
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
