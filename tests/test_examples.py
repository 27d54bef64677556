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
