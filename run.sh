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

install_browser() {
  # The browser test drives Debian's Chromium (Playwright's own download needs the network). Install it
  # quietly where apt-get can; otherwise carry on: that test then skips, unless REQUIRE_BROWSER=1.
  [ -x /usr/bin/chromium ] && return 0
  command -v apt-get >/dev/null 2>&1 || return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else return 0; fi
  fi
  echo "installing Debian's chromium for the browser test (log: /tmp/lora-studio-apt.log)" >&2
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; } \
    >/tmp/lora-studio-apt.log 2>&1 || echo "could not install chromium; the browser test will skip" >&2
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
    install_browser || true
    exec "$PY" -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh app [lora-studio args] | ./run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
