"""TorchScript export for openmm-torch's ``TorchForce``.

The exported module has the TorchForce contract ``forward(positions[N,3], boxvectors[3,3]) -> energy``
(nm in, kJ/mol out). openmm-torch passes float64 positions on the Reference/CPU platforms and the
context's precision on CUDA; the module computes in the model's dtype and returns a float64
scalar (openmm-torch reads it with ``item<double>()`` and takes forces from autograd, which
returns them in the positions' dtype). The system's topology is baked in as buffers.

Errors inside the module:
- ``host_checks=True`` (default): NaN positions, a box under twice the cutoff and pair-list
  overflow raise a RuntimeError naming the problem. This reads one flag on the host per call.
- ``host_checks=False``: for ``TorchForce.setProperty("useCUDAGraphs", "true")``; nothing is read
  on the host and the same conditions make the energy (and so the forces) NaN, which OpenMM
  then reports as a NaN energy / coordinate.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .hybridgraph import CGEnergy, CGModel
from .neighbors import (
    DEFAULT_SKIN_NM,
    CellNeighborSearch,
    VerletNeighborSearch,
    make_neighbor_search,
    make_verlet_search,
    pair_capacity,
)
from .system import SystemTensors, build_system_tensors, check_topology

METADATA_FILE = "metadata.json"


class SystemForce(nn.Module):
    """One CG system's energy for TorchForce: forward(positions[N,3], boxvectors[3,3]) -> energy."""

    def __init__(self, energy: CGEnergy, system: SystemTensors, inverse_temperature: float,
                 reference_temperature: float, uses_temperature: bool, include_prior: bool, host_checks: bool,
                 dtype: torch.dtype):
        super().__init__()
        self.energy = energy
        for name, value in system._asdict().items():
            self.register_buffer(name, value)
        self.register_buffer("inverse_temperature", torch.tensor([inverse_temperature], dtype=dtype))
        self.reference_temperature = float(reference_temperature)
        self.uses_temperature = bool(uses_temperature)
        self.include_prior = bool(include_prior)
        self.host_checks = bool(host_checks)
        self.n_beads = int(system.bead_type.shape[0])
        self.capacity = pair_capacity(self.n_beads, energy.neighbors.max_pairs_per_bead)
        search = energy.neighbors
        self.neighbor_skin_nm = float(search.skin) if isinstance(search, VerletNeighborSearch) else 0.0
        if isinstance(search, VerletNeighborSearch):
            search = search.fallback
        self.neighbor_backend = "cell" if isinstance(search, CellNeighborSearch) else "dense"

    def system(self) -> SystemTensors:
        return SystemTensors(self.bead_type, self.molecule_index, self.intra_i, self.intra_j,
                             self.bond_i, self.bond_j, self.bond_r0, self.bond_k,
                             self.angle_i, self.angle_j, self.angle_k, self.angle_theta0, self.angle_k_theta,
                             self.bond_entry, self.angle_entry)

    @torch.jit.export
    def set_temperature(self, temperature_K: float) -> None:
        """Change the 1/T input (models built with use_temperature)."""
        if not temperature_K > 0.0:
            raise RuntimeError("set_temperature: temperature_K must be positive")
        self.inverse_temperature.fill_(1.0 / temperature_K)

    def evaluate(self, positions: Tensor, boxvectors: Tensor, inverse_temperature: Tensor) -> Tensor:
        if positions.dim() != 2 or positions.shape[0] != self.n_beads or positions.shape[1] != 3:
            raise RuntimeError(f"positions must have shape ({self.n_beads}, 3) (CG topology order)")
        if boxvectors.dim() != 2 or boxvectors.shape[0] != 3 or boxvectors.shape[1] != 3:
            raise RuntimeError("boxvectors must have shape (3, 3): this model needs periodic boundary conditions")
        dtype = self.inverse_temperature.dtype
        pos = positions.to(dtype).unsqueeze(0)
        box = boxvectors.to(device=positions.device, dtype=dtype).unsqueeze(0)
        feature: Optional[Tensor] = None
        if self.uses_temperature:
            feature = (inverse_temperature.to(dtype).reshape(1) * self.reference_temperature - 1.0)
        energy, flags, count = self.energy(pos, box, self.system(), feature, True, self.include_prior)
        nonfinite = ~(torch.isfinite(pos).all() & torch.isfinite(box).all())
        flags = flags | torch.where(nonfinite, 8, 0)  # FLAG_NONFINITE
        if self.host_checks:
            code = int(flags[0])
            if code != 0:
                reasons: list[str] = []
                if code & 8:
                    reasons.append("positions or box vectors contain NaN/inf")
                if code & 2:
                    reasons.append("box smaller than twice the model cutoff (or than its cell grid)")
                if code & 1:
                    reasons.append("intermolecular pairs (" + str(int(count[0])) + ") exceed the pair capacity ("
                                   + str(self.capacity) + "): re-export with a larger max_pairs_per_bead")
                if code & 4:
                    reasons.append("a cell-list cell overflowed: re-export with neighbor_backend='dense'")
                raise RuntimeError("CG model: " + "; ".join(reasons))
            return energy[0]
        return torch.where(flags[0] != 0, torch.full_like(energy[0], math.nan), energy[0])

    def forward(self, positions: Tensor, boxvectors: Tensor) -> Tensor:
        return self.evaluate(positions, boxvectors, self.inverse_temperature)


class SystemForceWithTemperature(SystemForce):
    """Variant taking T as a TorchForce global parameter: forward(positions, boxvectors, temperature).

    Use with ``TorchForce.addGlobalParameter("temperature", T)`` so ``context.setParameter`` changes
    the model's temperature at run time (the plain module freezes its buffer when OpenMM loads it).
    """

    def forward(self, positions: Tensor, boxvectors: Tensor, temperature: Tensor) -> Tensor:
        return self.evaluate(positions, boxvectors, 1.0 / temperature)


def script_for_system(
    model: CGModel, bead_type, molecule_index, temperature_K: float | None = None, include_prior: bool = True,
    neighbor_backend: str | None = None, box=None, host_checks: bool = True, temperature_parameter: bool = False,
    max_pairs_per_bead: float | None = None, neighbor_skin_nm: float | None = None,
) -> torch.jit.ScriptModule:
    """Script ``model`` for one CG system (bead types and molecule of each bead, CG topology order).

    ``temperature_K`` is required for models with the 1/T input. ``neighbor_backend`` overrides the
    model's; "cell" needs ``box`` (3x3, nm) to fix its grid, and "auto" without a box gives "dense". ``temperature_parameter=True`` exports
    the 3-argument variant (T as an OpenMM global parameter).

    ``neighbor_skin_nm``: with host checks and a ``box``, the pair list is built with this skin and
    reused while it stays exact (``VerletNeighborSearch``; default ``DEFAULT_SKIN_NM``; 0 turns it
    off). Without host checks (CUDA graphs) every call searches afresh.
    """
    config = model.config
    bead_type = torch.as_tensor(bead_type, dtype=torch.long).cpu()
    molecule_index = torch.as_tensor(molecule_index, dtype=torch.long).cpu()
    check_topology(bead_type, molecule_index, config.n_bead_types)
    include_prior = bool(include_prior) and model.prior is not None  # nothing to include otherwise
    inverse_temperature = 0.0
    if config.use_temperature and not temperature_parameter:
        if temperature_K is None or not (math.isfinite(temperature_K) and temperature_K > 0):
            raise ValueError(f"this model takes 1/T: give a positive temperature_K (got {temperature_K!r})")
        inverse_temperature = 1.0 / float(temperature_K)
    backend = neighbor_backend or config.neighbor_backend
    box_t = None if box is None else torch.as_tensor(np.asarray(box, dtype=np.float64)).reshape(1, 3, 3)
    if box_t is not None and float(torch.diagonal(box_t[0]).min()) < 2 * model.cutoff_nm:
        raise ValueError(f"box is smaller than twice the model cutoff ({model.cutoff_nm} nm)")
    device = torch.device("cpu")
    energy = copy.deepcopy(model.energy).to(device).eval()
    capacity_per_bead = max_pairs_per_bead or config.max_pairs_per_bead
    skin = (DEFAULT_SKIN_NM if neighbor_skin_nm is None else float(neighbor_skin_nm)) if host_checks else 0.0
    if skin < 0 or not math.isfinite(skin):
        raise ValueError(f"neighbor_skin_nm must be >= 0, got {neighbor_skin_nm!r}")
    if skin > 0 and box_t is not None:
        energy.neighbors = make_verlet_search(backend, model.search_cutoff, capacity_per_bead, skin, box_t,
                                              int(bead_type.shape[0]), config.cell_capacity_factor, model.dtype)
    else:
        energy.neighbors = make_neighbor_search(backend, model.search_cutoff, capacity_per_bead, config.cell_capacity_factor,
                                                box_t, int(bead_type.shape[0]))
    energy.neighbors = energy.neighbors.to(device)
    for parameter in energy.parameters():
        parameter.requires_grad_(False)
    energy.trim_pairs = bool(host_checks)  # the host read is already paid for by the checks
    system = build_system_tensors(bead_type, molecule_index, model.prior if include_prior else None, device=device,
                                  dtype=model.dtype)
    cls = SystemForceWithTemperature if temperature_parameter else SystemForce
    module = cls(energy, system, inverse_temperature, config.reference_temperature_K, config.use_temperature,
                 include_prior, host_checks, model.dtype)
    return torch.jit.script(module)


def system_metadata(
    model: CGModel, bead_type, molecule_index, bead_names: Sequence[str], masses, mapping_sha256: str | None,
    temperature_K: float | None, include_prior: bool, **extra: Any,
) -> dict[str, Any]:
    """The metadata block that docs/contracts.md requires for ``model.pt``."""
    from .. import __version__

    bead_type = [int(t) for t in np.asarray(bead_type).reshape(-1)]
    masses = [float(m) for m in np.asarray(masses, dtype=np.float64).reshape(-1)]
    if len(bead_names) != len(bead_type) or len(masses) != len(bead_type):
        raise ValueError(
            f"metadata: bead_names ({len(bead_names)}) and masses ({len(masses)}) must have one entry per bead "
            f"({len(bead_type)})"
        )
    config = model.config
    include_prior = bool(include_prior) and model.prior is not None
    names = config.bead_type_names or (model.prior.bead_type_names if model.prior is not None else None)
    metadata = {
        "units": {"length": "nm", "energy": "kJ/mol", "mass": "amu", "temperature": "K"},
        "cutoff_intra_nm": config.intra_cutoff_nm,
        "cutoff_inter_nm": config.inter_cutoff_nm,
        "bead_type_names": list(names) if names is not None else None,
        "bead_type": bead_type,
        "bead_names": list(bead_names),
        "masses": masses,
        "n_beads": len(bead_type),
        "molecule_index": [int(m) for m in np.asarray(molecule_index).reshape(-1)],
        "mapping_sha256": mapping_sha256,
        "uses_temperature": bool(config.use_temperature),
        "temperature_K": None if temperature_K is None else float(temperature_K),
        "includes_prior": bool(include_prior),
        "package_version": __version__,
        "periodic": True,
        "neighbor_backend": config.neighbor_backend,
        "max_pairs_per_bead": config.max_pairs_per_bead,
        "dtype": config.dtype,
    }
    metadata.update(extra)
    return metadata


def save_scripted(module: torch.jit.ScriptModule, path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Save with ``metadata.json`` in the archive's extra files; written to a temp file, then renamed."""
    path = Path(path)
    text = json.dumps(metadata, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.jit.save(module, temporary, _extra_files={METADATA_FILE: text})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a saved model, read from the archive without loading the module."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_FILE}")]
            if not names:
                raise ValueError(f"{path}: no extra/{METADATA_FILE} in the TorchScript archive")
            return json.loads(archive.read(names[0]).decode())
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a TorchScript archive") from None


def export_for_frames(
    model: CGModel, cg, path: str | os.PathLike, mapping_sha256: str | None = None, temperature_K: float | None = None,
    include_prior: bool = True, **script_kw: Any,
) -> Path:
    """Script ``model`` for the CG system of ``cg`` (a CGFrames) and save it with full metadata."""
    if temperature_K is None and model.config.use_temperature:
        temperature_K = float(np.median(np.asarray(cg.temperature_K, dtype=np.float64)))
    script_kw.setdefault("box", np.asarray(cg.box)[0] if len(cg.box) else None)
    module = script_for_system(model, cg.bead_type, cg.molecule_index, temperature_K, include_prior, **script_kw)
    metadata = system_metadata(model, cg.bead_type, cg.molecule_index, list(cg.bead_name), cg.masses, mapping_sha256,
                               temperature_K, include_prior)
    metadata["neighbor_backend"] = module.neighbor_backend
    metadata["neighbor_skin_nm"] = module.neighbor_skin_nm
    metadata["max_pairs_per_bead"] = float(script_kw.get("max_pairs_per_bead") or model.config.max_pairs_per_bead)
    metadata["host_checks"] = bool(script_kw.get("host_checks", True))
    metadata["temperature_parameter"] = bool(script_kw.get("temperature_parameter", False))
    return save_scripted(module, path, metadata)
