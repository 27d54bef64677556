# Sourced by the build scripts: PY = the Python given as $1 (default .venv/bin/python, else
# python3), as an absolute path. Run from the repository root.
PY="${1:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
PY="$(command -v "$PY")"
