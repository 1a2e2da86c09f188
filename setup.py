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
        "test": ["pytest"],
        "bench": ["torchani==2.9.0"],
    },
    entry_points={"console_scripts": ["openmm-cgnn=openmm_cgnn.cli:main"]},
)
