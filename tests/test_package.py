"""Packaging: import without a built extension; what the build registered."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rnnext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_without_extension_warns_once_and_uses_reference():
    code = textwrap.dedent("""
        import importlib.abc, sys, warnings
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "rnnext._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import rnnext, torch
            import rnnext.ops, rnnext.functional
        msgs = [str(w.message) for w in caught if "extension is not built" in str(w.message)]
        assert len(msgs) == 1, msgs
        x = torch.randn(3, 2, 4)
        assert not rnnext.ops.available(x)
        assert rnnext.functional.backend_for(x) is rnnext.reference
        y, (h, c) = rnnext.LSTM(4, 5)(x)
        assert y.shape == (3, 2, 5)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rnnext::lstm_cell", "CUDA")
    assert rnnext.ops.available(torch.empty(1, device="cuda"))


def test_ci_runs_readme_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    install = "pip install -r requirements.txt && pip install --no-build-isolation -v -e ."
    assert install in readme and install in ci
    assert "```bash\npytest\n```" in readme and "\npytest\n" in ci


def test_readme_python_blocks_run():
    """README's examples are code that runs, not prose that drifts. Each block stands alone, but for the
    "Deploying" section's, which run in order as one session in test_deploy."""
    import re

    readme = open(os.path.join(ROOT, "README.md")).read()
    readme = re.sub(r"^## Deploying\n.*?(?=^## |\Z)", "", readme, flags=re.S | re.M)
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
