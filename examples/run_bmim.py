"""The whole openmm_cgnn chain for [BMIM][BF4]: ``openmm-cgnn run --liquid bmim_bf4`` (see ``openmm_cgnn/driver.py``).

    python examples/run_bmim.py --quick              # 2-core CPU, about 10 minutes, tiny sizes
    python examples/run_bmim.py --size cpu --jobs 2  # CPU-sized verdict, 550-700 K, about 1.5 hours on 2 cores
    python examples/run_bmim.py                      # full size, meant for a CUDA GPU
    python examples/run_bmim.py --gpus 0,1           # full size, temperatures spread over two GPUs

Every option of ``openmm-cgnn run`` works here (``--jobs``, ``--gpus``, ``--print-commands``, ...);
other liquids: ``openmm-cgnn run --liquid emim_bf4 --quick``.
"""

from __future__ import annotations

import sys

from openmm_cgnn.cli import main

if __name__ == "__main__":
    if any(a == "--liquid" or a.startswith("--liquid=") for a in sys.argv[1:]):
        raise SystemExit("run_bmim.py: the liquid is [BMIM][BF4]; for another use openmm-cgnn run --liquid NAME")
    raise SystemExit(main(["run", "--liquid", "bmim_bf4", *sys.argv[1:]]))
