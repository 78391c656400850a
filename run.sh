#!/usr/bin/env bash
# LoRA Studio launcher.
#   ./run.sh app [ARGS]   install what is missing, then start the web UI (lora-studio ARGS)
#   ./run.sh test [ARGS]  install what is missing (test extras too), then run the test suite (pytest ARGS)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

install_torch() {
  # Keep a torch that is already there (a CUDA build on a GPU machine stays). Without one, take the
  # pinned build: pip picks the CPU wheel where the index offers it, and GPU users can install CUDA torch first.
  if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
  fi
}

case "${1:-app}" in
  app)
    shift || true
    install_torch
    "$PY" -m pip install -q -e .
    exec "$PY" -m lora_core.cli "$@"
    ;;
  test)
    shift || true
    install_torch
    "$PY" -m pip install -q -e ".[test]"
    exec "$PY" -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh app [lora-studio args] | ./run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
