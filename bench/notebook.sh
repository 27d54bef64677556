#!/usr/bin/env bash
# Re-executes examples/demo.ipynb in place (outputs committed with it), with nbclient.
#   bash bench/notebook.sh [PYTHON]
# PYTHON needs lrgptq (the dev build: PYTHONPATH=python), the demo's packages, matplotlib, nbclient,
# nbformat and ipykernel (not CI's requirements; e.g. a venv of its own: pip install nbclient nbformat
# ipykernel matplotlib). A few minutes on two CPU cores.
set -euo pipefail
PY=${1:-python}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$PY" - <<'PYEOF'
import time

import nbformat
from nbclient import NotebookClient

path = "examples/demo.ipynb"
nb = nbformat.read(path, as_version=4)
t0 = time.perf_counter()
NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
nbformat.write(nb, path)
print(f"executed {path} in {time.perf_counter() - t0:.0f} s")
PYEOF
