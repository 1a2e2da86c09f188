from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("openmm_cgnn/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="openmm_cgnn",
    version=version["__version__"],
    description="Learned coarse-graining of molecular liquids (CGAE mapping + Hybridgraph SchNet) run in OpenMM",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["openmm_cgnn", "openmm_cgnn.*"]),
    package_data={"openmm_cgnn": ["aa/data/*", "aa/data/*/*", "liquids/*.json", "openmm/cpp/*"]},
    install_requires=[
        # The three pins were tried together: openmmtorch 1.5 needs a CUDA build of torch (the
        # default 2.9.1 wheel, which also runs on CPU-only machines), and OpenMM 8.6 crashes when
        # deserializing a TorchForce.
        "torch==2.9.1",
        "openmm==8.5.2",
        "openmmtorch==1.5",
        "numpy",
        "scipy",
        "mdtraj",
        "parmed",
        "h5py",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        # ruff: pinned, so that a new release's checks cannot fail CI on unchanged code (rules: ruff.toml).
        "test": ["pytest", "MDAnalysis", "ruff==0.17.6"],
        "bench": ["torchani==2.9.0"],
        # `openmm-cgnn import` reads GROMACS and LAMMPS files with MDAnalysis.
        "import": ["MDAnalysis"],
        # OpenMM's and openmm-torch's CUDA kernels ship as separate packages, named by these
        # extras of theirs. The pinned torch 2.9.1 wheel from PyPI is built for CUDA 12.8, so
        # cuda12 is the one that matches it; cuda13 needs a CUDA 13 build of torch (PyTorch's cu130 index).
        "cuda12": ["openmm[cuda12]==8.5.2", "openmmtorch[cuda12]==1.5"],
        "cuda13": ["openmm[cuda13]==8.5.2", "openmmtorch[cuda13]==1.5"],
    },
    entry_points={"console_scripts": ["openmm-cgnn=openmm_cgnn.cli:main"]},
)
