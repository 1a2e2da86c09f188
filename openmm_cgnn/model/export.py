"""The system module for openmm-torch's ``TorchForce``, and its TorchScript export.

The module has the TorchForce contract ``forward(positions[N,3], boxvectors[3,3]) -> energy``
(nm in, kJ/mol out). openmm-torch passes float64 positions on the Reference/CPU platforms and the
context's precision on CUDA; the module computes in the model's dtype and returns a float64
scalar (openmm-torch reads it with ``item<double>()`` and takes forces from autograd, which
returns them in the positions' dtype). The system's topology is baked in as buffers.

Bad data never raises inside the module. An exception thrown by a scripted module inside
openmm-torch can take the whole process down (a segmentation fault once a second Context exists),
and under CUDA graphs nothing can be raised at all. NaN/inf positions or box vectors, a box under
twice the cutoff, a pair-list overflow and a cell overflow all give a NaN energy *and* a NaN force
on every component of every particle; OpenMM's NaN check or the runner's own check notices, and
:func:`diagnose` (or the module's exported ``diagnose`` method) evaluates the same module on the
offending positions to name the cause: the :class:`~openmm_cgnn.model.geometry.Flag` bits and the
pair count against the capacity.

Two variants with the same error semantics (``build_system_module(..., host_checks=...)``):

- host-reading (``host_checks=True``, the default; for the CPU and Reference platforms): the pair
  list is reused with a skin (``VerletNeighborSearch``) and cut to the pairs found, which reads a
  few values on the host per call;
- graph-safe (``host_checks=False``; for ``TorchForce.setProperty("useCUDAGraphs", "true")``):
  no host reads at all and static shapes; every call searches afresh over the full capacity.
"""

from __future__ import annotations

import copy
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..io import atomic_path
from .geometry import FLAG_BOX_TOO_SMALL, FLAG_CELL_OVERFLOW, FLAG_NONFINITE, FLAG_PAIR_OVERFLOW, Flag, box_too_small
from .filter_table import DEFAULT_FILTER_INTERVALS, TabulatedInteractionStack, tabulate_filters
from .hybridgraph import CGEnergy, CGModel, describe_flags
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
                 dtype: torch.dtype, cutoff_nm: float):
        super().__init__()
        self.energy = energy
        for name, value in system._asdict().items():
            self.register_buffer(name, value)
        self.register_buffer("inverse_temperature", torch.tensor([inverse_temperature], dtype=dtype))
        self.reference_temperature = float(reference_temperature)
        self.uses_temperature = bool(uses_temperature)
        self.include_prior = bool(include_prior)
        self.host_checks = bool(host_checks)  # host reads allowed (skin reuse, pair trimming)
        self.graph_safe = not self.host_checks
        self.cutoff_nm = float(cutoff_nm)  # the largest interaction range: the box must be twice as wide
        self.search_cutoff_nm = float(energy.neighbors.cutoff)  # what the search checks the box against
        self.n_beads = int(system.bead_type.shape[0])
        self.max_pairs_per_bead = float(energy.neighbors.max_pairs_per_bead)
        self.capacity = pair_capacity(self.n_beads, self.max_pairs_per_bead)
        search = energy.neighbors
        self.neighbor_skin_nm = float(search.skin) if isinstance(search, VerletNeighborSearch) else 0.0
        if isinstance(search, VerletNeighborSearch):
            search = search.fallback
        self.neighbor_backend = "cell" if isinstance(search, CellNeighborSearch) else "dense"
        # intervals of the tabulated filters (model/filter_table.py); 0: the exact filters
        self.filter_intervals = max([int(m.intervals) for m in energy.modules() if isinstance(m, TabulatedInteractionStack)],
                                    default=0)

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

    def inputs(self, positions: Tensor, boxvectors: Tensor,
               inverse_temperature: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Checked positions (1, N, 3) and box (1, 3, 3) in the model's dtype, and the 1/T feature."""
        if positions.dim() != 2 or positions.shape[0] != self.n_beads or positions.shape[1] != 3:
            raise RuntimeError(f"positions must have shape ({self.n_beads}, 3) (CG topology order)")
        if boxvectors.dim() != 2 or boxvectors.shape[0] != 3 or boxvectors.shape[1] != 3:
            raise RuntimeError("boxvectors must have shape (3, 3): this model needs periodic boundary conditions")
        dtype = self.inverse_temperature.dtype
        feature: Optional[Tensor] = None
        if self.uses_temperature:
            feature = (inverse_temperature.to(dtype).reshape(1) * self.reference_temperature - 1.0)
        return positions.to(dtype).unsqueeze(0), boxvectors.to(device=positions.device, dtype=dtype).unsqueeze(0), feature

    def flagged_energy(self, positions: Tensor, boxvectors: Tensor,
                       inverse_temperature: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(energy () float64, flags () int, intermolecular pair count ()) of one frame."""
        pos, box, feature = self.inputs(positions, boxvectors, inverse_temperature)
        energy, flags, count = self.energy(pos, box, self.system(), feature, True, self.include_prior)
        flags = flags | self.nonfinite_flag(pos, box)
        if self.cutoff_nm > self.search_cutoff_nm:
            # the search checks its own cutoff; the intramolecular one reaches further here
            flags = flags | torch.where(box_too_small(box, self.cutoff_nm), Flag.BOX_TOO_SMALL.value, 0)
        return energy[0], flags[0], count[0]

    def nonfinite_flag(self, pos: Tensor, box: Tensor) -> Tensor:
        # One reduction instead of two isfinite passes: a NaN or inf anywhere makes the sum non-finite.
        return torch.where(~torch.isfinite(pos.sum() + box.sum()), Flag.NONFINITE.value, 0)

    def poisoned(self, energy: Tensor, flags: Tensor, positions: Tensor) -> Tensor:
        """``energy`` where ``flags`` is 0; NaN energy and NaN forces on every particle otherwise."""
        # Without a host read. A NaN chosen by torch.where would send no gradient (forces exactly 0),
        # and a NaN factor on the energy alone leaves beads outside every pair at zero force; a NaN
        # times the positions reaches every component. With good data the term is exactly 0 and
        # changes nothing, bit for bit. A scalar factor on the positions' sum does that with one
        # multiplication of a number.
        poison = torch.where(flags != 0, math.nan, 0.0).to(energy.dtype)
        return energy + positions.sum().to(energy.dtype) * poison

    def evaluate(self, positions: Tensor, boxvectors: Tensor, inverse_temperature: Tensor) -> Tensor:
        energy, flags, count = self.flagged_energy(positions, boxvectors, inverse_temperature)
        return self.poisoned(energy, flags, positions)

    def energy_of_pairs(self, positions: Tensor, boxvectors: Tensor, index_i: Tensor, index_j: Tensor,
                        valid: Tensor) -> Tensor:
        """``forward`` on an intermolecular pair list (1, P) found outside the module (a list with a
        skin, :class:`~openmm_cgnn.model.neighbors.SkinPairList`): pairs past the cutoff are dropped.
        The caller answers the search's flags; non-finite positions still give NaN energy and forces."""
        pos, box, feature = self.inputs(positions, boxvectors, self.inverse_temperature)
        energy = self.energy.energy_of_pairs(pos, box, self.system(), feature, True, self.include_prior,
                                             index_i, index_j, valid, True)
        return self.poisoned(energy[0], self.nonfinite_flag(pos, box), positions)

    @torch.jit.export
    def diagnose(self, positions: Tensor, boxvectors: Tensor) -> Tuple[Tensor, Tensor]:
        """(flags, intermolecular pair count) of the same evaluation ``forward`` makes; why it gave NaN."""
        with torch.no_grad():
            _, flags, count = self.flagged_energy(positions.detach(), boxvectors.detach(), self.inverse_temperature)
        return flags, count

    def forward(self, positions: Tensor, boxvectors: Tensor) -> Tensor:
        return self.evaluate(positions, boxvectors, self.inverse_temperature)


class SystemForceWithTemperature(SystemForce):
    """Variant taking T as a TorchForce global parameter: forward(positions, boxvectors, temperature).

    Use with ``TorchForce.addGlobalParameter("temperature", T)`` so ``context.setParameter`` changes
    the model's temperature at run time (the plain module freezes its buffer when OpenMM loads it).
    """

    def forward(self, positions: Tensor, boxvectors: Tensor, temperature: Tensor) -> Tensor:
        return self.evaluate(positions, boxvectors, 1.0 / temperature)


def build_system_module(
    model: CGModel, bead_type, molecule_index, temperature_K: float | None = None, include_prior: bool = True,
    neighbor_backend: str | None = None, box=None, host_checks: bool = True, temperature_parameter: bool = False,
    max_pairs_per_bead: float | None = None, neighbor_skin_nm: float | None = None, skip_bonds: Sequence[int] = (),
    filter_intervals: int | None = DEFAULT_FILTER_INTERVALS,
) -> SystemForce:
    """The plain ``nn.Module`` of ``model`` for one CG system (bead types and molecule of each bead,
    CG topology order); :func:`script_for_system` scripts it for TorchForce.

    ``temperature_K`` is required for models with the 1/T input. ``neighbor_backend`` overrides the
    model's; "cell" needs ``box`` (3x3, nm) to fix its grid, and "auto" without a box gives "dense".
    ``temperature_parameter=True`` builds the 3-argument variant (T as an OpenMM global parameter).
    ``max_pairs_per_bead`` overrides the model's pair-list capacity (the runner regrows it this way).
    ``skip_bonds``: entries of the prior's bond list that get no term (bonds held by constraints).
    ``filter_intervals``: the Hybridgraph's continuous filters are tabulated on this many intervals
    (model/filter_table.py; float32 models only, float32-rounding accuracy at the default); 0 or None:
    computed exactly.

    ``host_checks=True``: the host-reading variant (CPU/Reference). With a ``box``, the pair list is
    built with the skin ``neighbor_skin_nm`` and reused while it stays exact (``VerletNeighborSearch``;
    default ``DEFAULT_SKIN_NM``; 0 turns it off), and it is cut to the pairs found.
    ``host_checks=False``: the graph-safe variant (CUDA graphs): no host reads, static shapes, a
    fresh search at every call. Both give NaN energy and forces on bad data (module docstring).
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
    capacity_per_bead = float(max_pairs_per_bead or config.max_pairs_per_bead)
    if not (math.isfinite(capacity_per_bead) and capacity_per_bead > 0):
        raise ValueError(f"max_pairs_per_bead must be positive, got {max_pairs_per_bead!r}")
    device = torch.device("cpu")
    energy = copy.deepcopy(model.energy).to(device).eval()
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
    if filter_intervals:
        tabulate_filters(energy, int(filter_intervals))
    energy.trim_pairs = bool(host_checks)  # a host read: never in the graph-safe variant
    system = build_system_tensors(bead_type, molecule_index, model.prior if include_prior else None, device=device,
                                  dtype=model.dtype, skip_bonds=skip_bonds)
    cls = SystemForceWithTemperature if temperature_parameter else SystemForce
    return cls(energy, system, inverse_temperature, config.reference_temperature_K, config.use_temperature,
               include_prior, host_checks, model.dtype, model.cutoff_nm)


def script_for_system(model: CGModel, bead_type, molecule_index, *args: Any, **kwargs: Any) -> torch.jit.ScriptModule:
    """:func:`build_system_module` scripted for openmm-torch's TorchForce (same arguments)."""
    return torch.jit.script(build_system_module(model, bead_type, molecule_index, *args, **kwargs))


@dataclass
class Diagnosis:
    """Why a system module gave NaN for one configuration (:func:`diagnose`)."""

    flags: int  # Flag bits; 0: the module saw nothing wrong
    count: int  # intermolecular pairs found within the search cutoff
    capacity: int  # pairs the list holds
    max_pairs_per_bead: float
    n_beads: int
    cutoff_nm: float

    @property
    def pair_overflow(self) -> bool:
        """The pair list is the problem: it overflowed with finite positions in a box of legal
        size (a box under twice the cutoff crowds the list too, but a larger list cannot help)."""
        return bool(self.flags & FLAG_PAIR_OVERFLOW) and not self.flags & (FLAG_NONFINITE | FLAG_BOX_TOO_SMALL)

    @property
    def cell_overflow(self) -> bool:
        return bool(self.flags & FLAG_CELL_OVERFLOW)

    def grown_max_pairs_per_bead(self, margin: float = 1.3) -> float:
        """A capacity per bead with ``margin`` head-room over the count seen (and above the old one)."""
        wanted = math.ceil(margin * 2.0 * self.count / max(self.n_beads, 1))
        return float(max(wanted, math.floor(self.max_pairs_per_bead) + 1))

    def causes(self) -> list[str]:
        """The flag names set, lower case ("pair_overflow", "nonfinite", ...)."""
        return [flag.name.lower() for flag in Flag if self.flags & flag.value]

    def as_dict(self) -> dict[str, Any]:
        return {"causes": self.causes(), "flags": self.flags, "pair_count": self.count, "pair_capacity": self.capacity,
                "max_pairs_per_bead": self.max_pairs_per_bead, "message": self.message()}

    def message(self) -> str:
        if not self.flags:
            return "the model reports no problem with these positions"
        return describe_flags(self.flags, self.capacity, self.count, self.cutoff_nm)


def diagnose(module: Any, positions, box) -> Diagnosis | None:
    """Evaluate the system module (scripted or not) on one configuration and say what is wrong.

    ``positions`` (N, 3) and ``box`` (3, 3) in nm. None for modules without the ``diagnose``
    method (model.pt files written before it existed, or other TorchForce modules).
    """
    if not hasattr(module, "diagnose"):
        return None
    positions = torch.as_tensor(np.asarray(positions, dtype=np.float64))
    box = torch.as_tensor(np.asarray(box, dtype=np.float64)).reshape(3, 3)
    flags, count = module.diagnose(positions, box)
    return Diagnosis(int(flags), int(count), int(module.capacity), float(module.max_pairs_per_bead),
                     int(module.n_beads), float(module.cutoff_nm))


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
    with atomic_path(path) as temporary:
        torch.jit.save(module, str(temporary), _extra_files={METADATA_FILE: json.dumps(metadata, indent=2)})
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
    metadata["filter_intervals"] = module.filter_intervals
    metadata["max_pairs_per_bead"] = float(script_kw.get("max_pairs_per_bead") or model.config.max_pairs_per_bead)
    metadata["host_checks"] = bool(script_kw.get("host_checks", True))
    metadata["graph_safe"] = not metadata["host_checks"]
    metadata["temperature_parameter"] = bool(script_kw.get("temperature_parameter", False))
    return save_scripted(module, path, metadata)
