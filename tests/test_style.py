"""The sources keep the style their formatter configs describe: ruff (pyproject.toml) for Python, clang-format
(.clang-format) for C++ and CUDA. Both tools come with requirements.txt."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tool(name):
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (requirements.txt lists it)")
    return found


def test_python_passes_ruff():
    run = subprocess.run([tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_cpp_matches_clang_format():
    sources = sorted(str(p.relative_to(ROOT)) for ext in ("h", "cpp", "cu", "cuh")
                     for p in (ROOT / "csrc").rglob("*." + ext))
    assert sources
    run = subprocess.run([tool("clang-format"), "--style=file", "--dry-run", "--Werror", *sources], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
