"""Static checks of the compiled persistent CUDA kernels, no GPU needed: the sm_90 machine code (SASS) that
nvcc put in rnnext/_C*.so, read with cuobjdump and nvdisasm (they ship with torch's triton and in the PyPI
packages nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm), each instruction traced to its source line (the
extension is built with -lineinfo). For every instantiation of persistent::forward_kernel / backward_kernel:

- no register spills: no local memory (``-res-usage`` LOCAL:0, STACK:0; no LDL/STL in the code);
- the per-step global loads (h, the gate gradients, the step's inputs) are asynchronous 16-byte copies
  (LDGSTS) or 128-bit loads (LDG.E.128): a narrower global load may come only from what runs once per
  launch (csrc/persistent/cta.h ``prologue``, ``assign``) or from the grid barrier's polling
  (csrc/cuda/persistent.cuh ``wait``);
- no 64-bit integer division anywhere (its subroutine's I2F.U64.RP: ~100 instructions per use);
- tensor cores do the products (HMMA).

Skipped where the extension has no CUDA code (a CPU-only build). ``python tests/test_sass.py [FILE]`` prints
the findings for any binary (a .so, .o or .cubin), e.g. for an experimental build.
"""
import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = re.compile(r"persistent\d+(forward|backward)_kernel")
SRC = os.path.join(ROOT, "csrc") + os.sep
ONCE = {"csrc/persistent/cta.h": ("prologue", "assign"), "csrc/cuda/persistent.cuh": ("wait",)}


def tool(name):
    """A CUDA binary utility of the toolkit, of torch's triton, or of a PyPI package; None if there is none."""
    candidates = [shutil.which(name), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    import site
    for d in site.getsitepackages():
        candidates += glob.glob(os.path.join(d, "nvidia", "*", "bin", name))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def extension():
    import rnnext
    found = glob.glob(os.path.join(os.path.dirname(rnnext.__file__), "_C*.so"))
    return found[0] if found else None


def run(name, *args, cwd=None):
    return subprocess.run([tool(name), *args], capture_output=True, text=True, check=True, cwd=cwd).stdout


def once_lines():
    """{source file: set of line numbers} of the functions whose loads run once per launch."""
    lines = {}
    for path, names in ONCE.items():
        src = open(os.path.join(ROOT, path)).read().splitlines()
        mine = lines.setdefault(path, set())
        for i, text in enumerate(src):
            if not re.search(r"\b(" + "|".join(names) + r")\(", text) or not re.search(r"\)\s*(const\s*)?\{\s*$", text):
                continue
            depth = 0
            for j in range(i, len(src)):  # the body, by its braces
                depth += src[j].count("{") - src[j].count("}")
                mine.add(j + 1)
                if depth == 0:
                    break
    return lines


@functools.lru_cache(maxsize=None)
def kernels(binary):
    """{mangled name: {"res": {REG: .., LOCAL: .., ...}, "code": [(mnemonic, (csrc file, line) or None)]}} of the
    persistent kernels in binary (sm_90 code)."""
    out = {}
    for name, res in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", run("cuobjdump", "-res-usage", binary)):
        if KERNEL.search(name):
            out[name.rstrip(":")] = {"res": {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", res)},
                                     "code": []}
    with tempfile.TemporaryDirectory() as tmp:
        if binary.endswith(".cubin"):
            cubins = [os.path.abspath(binary)]
        else:
            run("cuobjdump", "-xelf", "all", os.path.abspath(binary), cwd=tmp)
            cubins = sorted(glob.glob(os.path.join(tmp, "*sm_90*.cubin")))
        text = "".join(run("nvdisasm", "-gi", "-c", c) for c in cubins)
    fn, where, comment = None, None, False
    for line in text.splitlines():
        m = re.match(r"\s*\.text\.(\S+):", line)
        if m:
            fn = out.get(m.group(1))
            continue
        if fn is None:
            continue
        chain = re.findall(r'"([^"]+)", line (\d+)', line) if line.lstrip().startswith("//##") else []
        if chain:
            if not comment:  # the first comment of a group has the inline chain, innermost first
                where = next(((os.path.relpath(f, ROOT), int(n)) for f, n in chain if f.startswith(SRC)), None)
            comment = True
            continue
        comment = False
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            fn["code"].append((m.group(1), where))
    return out


def findings(info, once=None):
    """What the checks above find wrong with one kernel (empty: nothing)."""
    once = once_lines() if once is None else once
    res, code = info["res"], info["code"]
    ops = [op for op, _ in code]
    bad = []
    if res.get("LOCAL", 0) or res.get("STACK", 0) or any(op.startswith(("LDL", "STL")) for op in ops):
        bad.append(f"local memory (spills): LOCAL:{res.get('LOCAL')} STACK:{res.get('STACK')}")
    narrow = [(op, where) for op, where in code
              if op.startswith("LDG") and not op.startswith(("LDGSTS", "LDG.E.128", "LDGDEPBAR"))
              and not (where and where[1] in once.get(where[0], ()))]
    if narrow:
        sites = sorted({f"{w[0]}:{w[1]}" if w else "?" for _, w in narrow})
        bad.append(f"{len(narrow)} per-step global loads narrower than 128 bits ({', '.join(sites[:4])})")
    if not any(op.startswith("LDGSTS") for op in ops):
        bad.append("no asynchronous 16-byte copy (LDGSTS)")
    div64 = sum(op.startswith("I2F.U64.RP") for op in ops)
    if div64:
        bad.append(f"64-bit integer division ({div64} x I2F.U64.RP)")
    if not any(op.startswith("HMMA") for op in ops):
        bad.append("no tensor-core instruction (HMMA)")
    return bad


def persistent_kernels():
    so = extension()
    if so is None or tool("cuobjdump") is None or tool("nvdisasm") is None:
        return []
    out = subprocess.run([tool("cuobjdump"), "-res-usage", so], capture_output=True, text=True)
    if out.returncode and "does not contain device code" in out.stdout + out.stderr:
        return []  # a CPU-only build
    out.check_returncode()
    names = re.findall(r"Function (\S+):", out.stdout)
    return sorted(n.rstrip(":") for n in names if KERNEL.search(n))


def _skip_reason():
    if extension() is None:
        return "extension not built"
    if tool("cuobjdump") is None or tool("nvdisasm") is None:
        return "no cuobjdump/nvdisasm (CUDA toolkit, triton or PyPI nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm)"
    if not persistent_kernels():
        return "the extension has no CUDA code (CPU-only build)"
    return None


needs_sass = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def test_once_per_launch_functions_are_found():
    """The source lines exempt from the load-width check exist (a renamed function would exempt nothing)."""
    lines = once_lines()
    assert all(len(lines[path]) > 3 for path in ONCE), {p: len(v) for p, v in lines.items()}


@needs_sass
def test_every_cell_and_type_has_persistent_kernels():
    """The kernels the checks read exist: forward and backward for each cell and tensor-core type."""
    names = persistent_kernels()
    assert sum("forward_kernel" in n for n in names) >= 5 and sum("backward_kernel" in n for n in names) >= 5


@needs_sass
@pytest.mark.parametrize("name", persistent_kernels())
def test_persistent_kernel_machine_code(name):
    assert findings(kernels(extension())[name]) == []


if __name__ == "__main__":
    binary = sys.argv[1] if len(sys.argv) > 1 else extension()
    for name, info in sorted(kernels(binary).items()):
        print(name, info["res"].get("REG"), "registers:", "; ".join(findings(info)) or "ok")
