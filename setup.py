"""Build fastseg's C++/CUDA extension.

A CUDAExtension when torch is a CUDA build and a CUDA toolkit is found (FORCE_CUDA=1 forces it), a
CppExtension otherwise. Honours TORCH_CUDA_ARCH_LIST, MAX_JOBS (torch's ninja builder reads it) and
FASTSEG_DEBUG=1 (-O0 -g). Install with `pip install --no-build-isolation .` so the installed torch is
the one compiled against.
"""
import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _use_cuda():
    if _flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _check_object_names(sources):
    # torch's ninja build names each object after its source without the extension, so x_cuda.cpp beside
    # x_cuda.cu is "multiple rules generate x_cuda.o" -- on CUDA machines only. Checked on every build.
    stems = {}
    for source in sources:
        stems.setdefault(os.path.splitext(source)[0], []).append(source)
    clashes = [names for names in stems.values() if len(names) > 1]
    if clashes:
        raise SystemExit(f"fastseg build: sources {clashes} would compile to the same object file; rename one")


def _extension():
    debug = _flag("FASTSEG_DEBUG")
    with_cuda = _use_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*_cpu.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*/*_cuda.cpp") + glob.glob("csrc/*/*.cu"))
    _check_object_names(sources + cuda_sources)
    torch_version = torch.__version__.split("+")[0]
    # -fno-trapping-math lets gcc if-convert (and so vectorise) the kernels' clamps and selects.
    cxx = ["-O0" if debug else "-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno",
           f'-DFASTSEG_TORCH_VERSION="{torch_version}"']
    if debug:
        cxx.append("-g")
    extra = {"cxx": cxx}
    kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[os.path.join(ROOT, "csrc")])
    if with_cuda:
        sources += cuda_sources
        cxx.append("-DFASTSEG_WITH_CUDA")
        extra["nvcc"] = ["-O0" if debug else "-O3", "-lineinfo", "--expt-relaxed-constexpr",
                         f'-DFASTSEG_TORCH_VERSION="{torch_version}"', "-DFASTSEG_WITH_CUDA"]
        ext = CUDAExtension("fastseg._C", sources, extra_compile_args=extra, **kwargs)
    else:
        ext = CppExtension("fastseg._C", sources, extra_compile_args=extra, **kwargs)
    print(
        "fastseg build: "
        f"{'CUDA' if with_cuda else 'CPU-only'} extension, torch {torch.__version__}, "
        f"CUDA_HOME={CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default>')}, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', '<auto>')}, debug={debug}, {len(sources)} sources",
        file=sys.stderr,
    )
    return ext


setup(
    packages=find_packages(include=["fastseg", "fastseg.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
