"""The build's choice of compiler (tools/toolchain.py) and what the built extension contains."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import toolchain  # noqa: E402

SYS = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30"
NEW = "/opt/gcc/lib64/libstdc++.so.6.0.34"
OLD = "/usr/lib/gcc-11/libstdc++.so.6.0.29"


def test_runtime_versions_compare():
    assert toolchain.runtime_version(SYS) == (6, 0, 30)
    assert toolchain.runtime_version("libstdc++.so.6") is None
    assert toolchain.compatible(OLD, SYS) and not toolchain.compatible(NEW, SYS)
    assert not toolchain.compatible(None, SYS)


@pytest.mark.parametrize("cands,want", [
    (["/opt/gcc/bin/g++", "/usr/bin/g++"], "/usr/bin/g++"),        # the H100 case: skip the newer runtime
    (["/usr/bin/g++-11", "/usr/bin/g++"], "/usr/bin/g++-11"),      # older runtime: compatible, order kept
    (["/opt/gcc/bin/g++"], "/opt/gcc/bin/g++"),                    # nothing compatible: default, flagged
])
def test_choose(cands, want):
    runtimes = {"/opt/gcc/bin/g++": NEW, "/usr/bin/g++": SYS, "/usr/bin/g++-11": OLD}
    cxx, rt, why = toolchain.choose(cands, SYS, runtime_of=runtimes.get)
    assert cxx == want and rt == runtimes[want]
    assert ("WARNING" in why) == (want == "/opt/gcc/bin/g++")


def test_link_drops_symbolic_functions():
    got = toolchain.without_symbolic_functions("gcc -shared -Wl,-O1 -Wl,-Bsymbolic-functions -g")
    assert got == "gcc -shared -Wl,-O1 -g"


def test_this_machine_picks_a_compatible_compiler():
    import torch  # noqa: F401

    loaded = toolchain.loaded_runtime()
    if loaded is None:
        pytest.skip("no /proc/self/maps or no libstdc++ loaded")
    cxx, rt, why = toolchain.choose(toolchain.candidates(), loaded)
    assert cxx and toolchain.compatible(rt, loaded), why


def test_extension_has_no_private_copy_of_stream_code():
    """The crash on the H100: _C.so defined std::ostream::_M_insert<long> itself (so error messages with
    numbers ran that copy); built right, it calls the loaded libstdc++'s."""
    from rnnext import ops

    if ops.LOAD_ERROR is not None or not shutil.which("nm"):
        pytest.skip("no built extension or no nm")
    out = subprocess.run(["nm", "-DC", "--defined-only", ops._C.__file__], capture_output=True, text=True,
                         check=True).stdout
    assert [line for line in out.splitlines() if "_M_insert" in line] == []
