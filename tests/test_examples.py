"""The example scripts a user would copy run as they are."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.mark.slow  # each script runs in its own interpreter, a minute on two cores
@pytest.mark.parametrize("script", ["quantize_layer.py", "from_your_script.py"])
def test_example_runs(script: str) -> None:
    if script == "from_your_script.py":
        pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nan" not in proc.stdout.lower()
    if script == "quantize_layer.py":
        errs = {line.split(":")[0].strip(): float(line.split("=")[1].split()[0]) for line in proc.stdout.splitlines()}
        assert errs["gptq"] < errs["rtn"] and errs["lrgptq"] < errs["rtn"]


def test_notebook_is_committed_executed() -> None:
    """examples/demo.ipynb is committed with its outputs (bench/notebook.sh re-executes it): every code
    cell ran, in order, and none ended in an error."""
    import json

    with open(os.path.join(EXAMPLES, "demo.ipynb"), encoding="utf-8") as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    assert cells, "the notebook has no code cells"
    counts = [c.get("execution_count") for c in cells]
    assert all(isinstance(n, int) for n in counts), f"cells not executed (execution counts {counts}): run bench/notebook.sh"
    assert counts == sorted(counts), f"cells executed out of order: {counts}"
    errors = [o.get("ename") for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"the committed notebook shows errors: {errors}"
    assert any(c.get("outputs") for c in cells), "no cell has an output"
