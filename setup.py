"""Build tokenreduce and its native op library (torch C++ extension `tokenreduce._C`).

The CPU kernels always build. CUDA kernels are added by a later step when a CUDA torch and
nvcc are present; until then a CUDA torch still gets the CPU build.

Knobs (build time only):
  TOKENREDUCE_NATIVE_ARCH=0  build without -march=native (for a portable binary).
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_sources():
    srcs = ["csrc/registration.cpp", "csrc/python_module.cpp"]
    srcs += sorted(glob.glob("csrc/*/*_cpu.cpp", root_dir=HERE))
    return srcs


def cxx_flags():
    flags = ["-O3", "-fopenmp", "-DAT_PARALLEL_OPENMP=1", "-Wno-unknown-pragmas"]
    if os.environ.get("TOKENREDUCE_NATIVE_ARCH", "1") != "0":
        flags.append("-march=native")
    return flags


setup(
    name="tokenreduce",
    version="0.1.0",
    description="Fast, measurable visual token reduction: fused ops, published methods, a CLI",
    packages=find_packages(include=["tokenreduce", "tokenreduce.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "rich>=13"],
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy"]},
    ext_modules=[
        CppExtension(
            "tokenreduce._C",
            cpu_sources(),
            extra_compile_args={"cxx": cxx_flags()},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["tokenreduce=tokenreduce.cli:main"]},
)
