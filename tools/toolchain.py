"""Which C++ compiler builds rnnext, so that the extension runs on the C++ runtime torch loads.

Why: on the H100 machines the extension built by the default compiler (/opt/gcc, with its own
libstdc++) crashed (SIGSEGV) at the first integer written into an error message: the call to
std::ostream::_M_insert<long> resolved to a copy inside _C.so instead of the libstdc++ torch loads
(observed there, commit 78341d3), the link having Python's `-Wl,-Bsymbolic-functions`. The likely
mechanism (not yet confirmed on that machine): /opt/gcc's headers differ from the loaded runtime,
so template code compiled from one ran on the data of the other.

So setup.py (1) picks a compiler whose libstdc++ is the one torch loads, or older (libstdc++ is
backward compatible, not forward), and (2) links without -Bsymbolic-functions, so that libstdc++'s
symbols resolve to the loaded runtime as in any normal build. `python tools/toolchain.py` prints what
it would pick and why.
"""
import glob
import os
import re
import shutil
import subprocess
import sys


def runtime_version(path):
    """(6, 0, 33) for .../libstdc++.so.6.0.33; None if the name carries no version."""
    m = re.search(r"libstdc\+\+\.so\.(\d+)\.(\d+)\.(\d+)$", os.path.realpath(path or ""))
    return tuple(map(int, m.groups())) if m else None


def loaded_runtime(maps="/proc/self/maps"):
    """The libstdc++ this process has loaded (import torch first), resolved; None if unknown."""
    try:
        with open(maps) as f:
            paths = {line.split()[-1] for line in f if "libstdc++.so" in line}
    except OSError:
        return None
    return os.path.realpath(sorted(paths)[0]) if paths else None


def compiler_runtime(cxx):
    """The libstdc++ that `cxx` links against, resolved; None if it does not say (e.g. clang with libc++)."""
    try:
        out = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = out.stdout.strip()
    return os.path.realpath(path) if out.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def candidates(env=os.environ):
    """$CXX first, then the usual names on PATH and the system's versioned g++."""
    names = [env.get("CXX"), shutil.which("c++"), shutil.which("g++"), "/usr/bin/g++", "/usr/bin/c++"]
    names += sorted(glob.glob("/usr/bin/g++-[0-9]*"), key=lambda p: [int(v) for v in re.findall(r"\d+", p)],
                    reverse=True)
    seen, out = set(), []
    for n in names:
        path = shutil.which(n) if n else None
        if path and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            out.append(path)
    return out


def compatible(compiler_rt, loaded_rt):
    """Code built against compiler_rt's headers runs on loaded_rt: the same runtime, or an older one."""
    if compiler_rt is None or loaded_rt is None:
        return False
    if os.path.realpath(compiler_rt) == os.path.realpath(loaded_rt):
        return True
    c, l = runtime_version(compiler_rt), runtime_version(loaded_rt)
    return c is not None and l is not None and c <= l


def choose(cands, loaded_rt, runtime_of=compiler_runtime):
    """(compiler, its runtime, why): the first candidate whose runtime is compatible with the loaded one;
    else the first candidate, flagged as a risk."""
    first = cands[0] if cands else None
    if loaded_rt is None:
        return first, runtime_of(first) if first else None, "cannot tell which libstdc++ torch loads: default compiler"
    for c in cands:
        rt = runtime_of(c)
        if compatible(rt, loaded_rt):
            same = os.path.realpath(rt) == os.path.realpath(loaded_rt)
            return c, rt, "its libstdc++ is " + ("the one torch loads" if same else "older than torch's (compatible)")
    return first, runtime_of(first) if first else None, (
        "WARNING: no compiler here uses torch's libstdc++ or an older one; the extension may crash at its first "
        "error message (tools/smoke.py checks)")


def c_compiler(cxx):
    """The C driver beside a C++ one (nvcc's -ccbin): g++-13 -> gcc-13, c++ -> cc, clang++ -> clang."""
    d, base = os.path.split(cxx)
    for cpp, c in (("clang++", "clang"), ("g++", "gcc"), ("c++", "cc")):
        if cpp in base:
            cand = os.path.join(d, base.replace(cpp, c))
            if os.path.exists(cand):
                return cand
    return cxx


def without_symbolic_functions(ldshared):
    """Python's link command minus -Bsymbolic-functions (see the module docstring)."""
    return " ".join(f for f in ldshared.split() if f not in ("-Wl,-Bsymbolic-functions", "-Bsymbolic-functions"))


def main():
    import torch  # noqa: F401  (loads torch's libstdc++)

    loaded = loaded_runtime()
    print(f"torch {torch.__version__} loads {loaded}")
    for c in candidates():
        rt = compiler_runtime(c)
        print(f"  {c}: libstdc++ {rt} -> {'ok' if compatible(rt, loaded) else 'NOT compatible'}")
    cxx, rt, why = choose(candidates(), loaded)
    print(f"chosen: {cxx} ({why}); C compiler {c_compiler(cxx) if cxx else None}")
    return 0 if cxx and compatible(rt, loaded) else 1


if __name__ == "__main__":
    sys.exit(main())
