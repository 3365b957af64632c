#!/usr/bin/env bash
# Sets up everything on a fresh Debian-like machine: espeak-ng and sox (speech synthesis and channel
# effects for the ASR demo),
# a virtual environment in .venv with the exact stack the test suite runs on (constraints.txt:
# torch 2.11.0, torchaudio 2.11.0, triton 3.6.0, ...), and this package in editable mode with its
# test, benchmark and ASR extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# sox renders the channel conditions of the ASR demo's out-of-domain sets (telephone band, reverb)
missing=""
for tool in espeak-ng sox; do command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] installing$missing (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "[setup] WARNING:$missing missing and cannot be installed without root; the ASR data step will fail" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check --upgrade pip setuptools wheel
echo "[setup] installing the pinned stack of constraints.txt (torch is a ~4.6 GB CUDA build; it also runs on CPU)"
$PIP install -q --disable-pip-version-check -c constraints.txt torch torchaudio triton numpy
# --no-build-isolation: setup.py needs the torch above to decide about (and build) the CUDA extension.
$PIP install -q --disable-pip-version-check -c constraints.txt --no-build-isolation -e ".[test,bench,asr]"
echo "[setup] ready: $(.venv/bin/python -c 'import torch, softvq_kernels as sk; print("torch", torch.__version__, "| backends here:", sk.available_backends("cpu"))')"
