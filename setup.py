"""Builds rnnext._C: a CUDAExtension when torch has CUDA and nvcc is found, else a CppExtension.

Environment: RNNEXT_NO_CUDA=1 forces CPU-only; RNNEXT_CPU_CAPABILITY=default|avx2|avx512 picks the CPU
kernels' SIMD (default: the best this build machine has); TORCH_CUDA_ARCH_LIST picks GPU architectures
(unset and no GPU visible: DEFAULT_ARCHS instead of torch's every-architecture list);
CUDA_HOME defaults to /usr/local/cuda when that exists; MAX_JOBS limits parallel compiles.
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

# cpp_extension reads CUDA_HOME when it is imported: decide before the import. The nvcc on PATH may
# be a wrapper script outside the toolkit, which makes torch guess a CUDA_HOME without libcudart.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME  # noqa: E402

DEFAULT_ARCHS = "8.0;9.0+PTX"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tools"))
import toolchain  # noqa: E402


def log(msg):
    print(f"rnnext setup: {msg}", flush=True)


def pick_compiler():
    """A C++ compiler whose libstdc++ is the one torch loads, and a link without -Bsymbolic-functions
    (tools/toolchain.py says why). Sets CXX, CC (nvcc's -ccbin) and LDSHARED for this build.
    RNNEXT_TRUST_CXX=1 keeps $CXX whatever its runtime."""
    loaded = toolchain.loaded_runtime()
    if os.environ.get("RNNEXT_TRUST_CXX") == "1" and os.environ.get("CXX"):
        cxx, rt, why = os.environ["CXX"], toolchain.compiler_runtime(os.environ["CXX"]), "RNNEXT_TRUST_CXX=1"
    else:
        cxx, rt, why = toolchain.choose(toolchain.candidates(), loaded)
    if cxx is None:
        log("no C++ compiler found")
        return
    if os.environ.get("CXX") and os.path.realpath(shutil.which(os.environ["CXX"]) or "") != os.path.realpath(cxx):
        log(f"ignoring CXX={os.environ['CXX']}: its libstdc++ ({toolchain.compiler_runtime(os.environ['CXX'])}) is "
            f"newer than torch's; set RNNEXT_TRUST_CXX=1 to use it anyway")
    cc = toolchain.c_compiler(cxx)
    os.environ["CXX"], os.environ["CC"] = cxx, cc
    ldshared = sysconfig.get_config_var("LDSHARED") or ""
    if ldshared and "LDSHARED" not in os.environ:
        os.environ["LDSHARED"] = toolchain.without_symbolic_functions(cc + " " + " ".join(ldshared.split()[1:]))
    log(f"C++ compiler {cxx}: {why} ({rt}; torch loads {loaded}); C compiler and nvcc -ccbin: {cc}; "
        f"link: {os.environ.get('LDSHARED', ldshared)}")


def want_cuda():
    if os.environ.get("RNNEXT_NO_CUDA", "0") == "1":
        return False, "RNNEXT_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc {nvcc}"


CPU_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],  # f16c: at::vec's Half
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def cpu_capability():
    """at::vec is scalar code unless compiled for a SIMD level: pick the best this machine has."""
    chosen = os.environ.get("RNNEXT_CPU_CAPABILITY")
    if chosen:
        if chosen not in CPU_FLAGS:
            raise SystemExit(f"RNNEXT_CPU_CAPABILITY must be one of {sorted(CPU_FLAGS)}, got {chosen!r}")
        return chosen
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "default"


def pip_cuda_includes():
    """cuBLAS and friends' headers that torch's pip dependencies ship (nvidia/cu13/include, ...)."""
    site = sysconfig.get_paths()["purelib"]
    return [d for d in sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*", "include"))) if os.path.isdir(d)]


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


def extension():
    pick_compiler()
    use_cuda, why = want_cuda()
    capability = cpu_capability()
    log(f"CPU kernels: {capability} SIMD")
    # at::parallel_for is inline OpenMP: without -fopenmp it silently runs on one thread.
    cxx = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"] + CPU_FLAGS[capability]  # nvcc's #pragma unroll in host code
    link = ["-fopenmp"]
    include_dirs = [os.path.join(HERE, "csrc")]
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if not use_cuda:
        log(f"building CPU-only extension ({why})")
        return CppExtension("rnnext._C", srcs, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    include_dirs += pip_cuda_includes()
    log(f"building CUDA extension: {why}; TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(this GPU)')}; "
        f"extra includes {include_dirs[1:]}")
    return CUDAExtension(
        "rnnext._C",
        srcs + sources("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link,
    )


setup(
    name="rnnext",
    version="0.1.0",
    description="Fused LSTM/GRU/RNN kernels (CPU and CUDA) as drop-in torch.nn layers",
    packages=find_packages(include=["rnnext", "rnnext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
