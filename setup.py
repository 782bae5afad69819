"""Builds rnnext._C: a CUDAExtension when torch has CUDA and nvcc is found, else a CppExtension.

Environment: RNNEXT_NO_CUDA=1 forces CPU-only; TORCH_CUDA_ARCH_LIST picks GPU architectures
(unset and no GPU visible: DEFAULT_ARCHS instead of torch's every-architecture list);
CUDA_HOME defaults to /usr/local/cuda when that exists; MAX_JOBS limits parallel compiles.
"""
import glob
import os
import shutil
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


def log(msg):
    print(f"rnnext setup: {msg}", flush=True)


def want_cuda():
    if os.environ.get("RNNEXT_NO_CUDA", "0") == "1":
        return False, "RNNEXT_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc {nvcc}"


def pip_cuda_includes():
    """cuBLAS and friends' headers that torch's pip dependencies ship (nvidia/cu13/include, ...)."""
    site = sysconfig.get_paths()["purelib"]
    return [d for d in sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include"))) if os.path.isdir(d)]


def sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


def extension():
    use_cuda, why = want_cuda()
    cxx = ["-O3"]
    include_dirs = [os.path.join(HERE, "csrc")]
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if not use_cuda:
        log(f"building CPU-only extension ({why})")
        return CppExtension("rnnext._C", srcs, include_dirs=include_dirs, extra_compile_args={"cxx": cxx})
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    include_dirs += pip_cuda_includes()
    log(f"building CUDA extension: {why}; TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(this GPU)')}; "
        f"extra includes {include_dirs[1:]}")
    return CUDAExtension(
        "rnnext._C",
        srcs + sources("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=[("RNNEXT_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
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
