"""The package's shape: the core never imports the demo's data helpers, and everything the README
shows is exported at the top."""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_the_core_never_imports_the_demo():
    # Every module of the library, imported in a fresh interpreter: lrgptq.demo must stay out.
    core = ("accumulate", "calib", "capture", "checkpoint", "cli", "config", "distributed", "eval", "formats",
            "limits", "linear", "models", "nn", "nn_vq", "ops", "pipeline", "storage", "streaming", "vq")
    code = ("import sys, importlib\n"
            f"for m in {core!r}: importlib.import_module('lrgptq.' + m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('lrgptq.demo')))")
    import lrgptq

    # the package this interpreter imports (an installed one, or a dev build under PYTHONPATH=python)
    where = os.path.dirname(os.path.dirname(lrgptq.__file__))
    path = os.pathsep.join([where, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_the_demo_subpackage_has_its_helpers():
    import lrgptq.demo as demo

    for name in ("load_demo_model", "austen_books", "run_demo", "CALIB_BOOK", "EVAL_BOOK", "cache_dir"):
        assert hasattr(demo, name), name


def test_every_name_the_readme_uses_is_exported_at_the_top():
    import re

    import lrgptq

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    code = "\n".join(re.findall(r"```python\n(.*?)```", readme, flags=re.S))
    prose = re.findall(r"`lrgptq\.(\w+)", readme)
    # `lrgptq.demo` is a subpackage, `lrgptq.json` the checkpoint's marker file: neither is an export
    names = set(re.findall(r"\blrgptq\.(\w+)", code)) | {n for n in prose if n not in ("demo", "json")}
    assert names, "the README shows no lrgptq names?"
    missing = sorted(n for n in names if n not in lrgptq.__all__)
    assert not missing, f"README names not exported by lrgptq: {missing}"
    for name in lrgptq.__all__:
        assert hasattr(lrgptq, name), name
