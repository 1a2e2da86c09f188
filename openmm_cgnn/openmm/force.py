"""``CGNNForce``: a trained CG force field as forces for an OpenMM ``System``.

``CGNNForce`` is the engine-independent binding: it loads the model, checks it against the
Topology, the System and the metadata, and places the prior. The network's module goes into the
System through a force *engine* (``engines.py``): openmm-torch's ``TorchForce`` ("torch", the
exportable one) or OpenMM's ``PythonForce`` with ``torch.compile`` ("python"); "auto" takes
``engines.default_engine`` of the platform. The force is found again by its index in the System
(``force_index``), never by its name. The prior either runs inside the
same TorchScript module ("model") or as native OpenMM forces ("openmm", see ``prior_forces.py``);
``DEFAULT_PRIOR_CARRIER`` is the one measured faster (benchmarks/prior_carrier.py writes
benchmarks/results/prior_carrier_<platform>.json). Before anything is added, the model's metadata is checked against
the Topology and the System, because a model applied to beads in another order runs without
complaint and gives nonsense.

The module never raises inside OpenMM (model/export.py): bad positions, a box under twice the
cutoff or a full pair list give NaN energy and forces. :meth:`CGNNForce.diagnose` evaluates the
same module on the offending positions and :meth:`CGNNForce.explain` turns the answer into one
line with the way out; :meth:`CGNNForce.regrow` scripts a model directory again with a larger pair
list. On the CUDA platform the graph-safe module runs with openmm-torch's CUDA graphs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..layout import MAPPING_JSON, PRIOR_JSON
from ..units import in_amu, in_kj_mol, in_kj_mol_nm, nm_array
from ..mapping.spec import CGMapping
from ..model.geometry import FLAG_BOX_TOO_SMALL, FLAG_NONFINITE
from ..platforms import versions  # noqa: F401  (re-exported: the versions report lives in platforms)
from .constraints import CONSTRAIN_BONDS, BondConstraint, add_constraints, choose_bond_constraints, constraint_pairs
from .engines import ENGINES, ForceEngine, default_engine, make_engine
from .prior_forces import load_prior, prior_forces
from .topology import CGConfiguration

PRIOR_CARRIERS = ("auto", "openmm", "model", "none")
# Native forces: on CPU (1 thread, CPU time per step) the quick example's trained model takes 3.2-3.3
# ms per bare step with its tabulated bonded prior as OpenMM forces and 4.1-5.7 ms with the prior
# inside the TorchScript module (network alone 3.2 ms, the native prior alone 0.23 ms); a harmonic
# prior inside costs 4.4 against 3.4 ms; a real run (benchmarks/results/simulate_cpu.json) 5.26
# against 6.01 ms. The prior's small ops cost more in TorchScript than in OpenMM's kernels.
# (prior_carrier_cpu.json had the two level: wall-clock blocks on a loaded machine.) Native forces
# are also what multiple time stepping needs (their own force group). CUDA: not measured.
# The compiled PythonForce engine is the exception: inside its graph the prior fuses into the
# network's kernels, while OpenMM's CPU platform spends ~0.3 ms per step on the excluded-volume
# CustomNonbondedForce alone (bench_md.py, quick network, 8 fs, 1 thread, results/md_cpu.json: prior
# inside against native 1.60 / 2.36 / 5.96 / 19.4 against 1.95 / 2.55 / 7.23 / 22.0 ms at 80-1500 beads).
DEFAULT_PRIOR_CARRIER = "openmm"
DEFAULT_PRIOR_CARRIER_BY_ENGINE = {"python": "model"}
MASS_TOLERANCE_AMU = 1e-3
TEMPERATURE_TOLERANCE_K = 1e-6
REQUIRED_METADATA = ("n_beads", "bead_names", "bead_type", "bead_type_names", "masses", "includes_prior")


def auto_prior_carrier(engine: str) -> str:
    """Where ``prior="auto"`` puts a model directory's prior for ``engine`` ("auto": not known yet)."""
    return DEFAULT_PRIOR_CARRIER_BY_ENGINE.get(engine, DEFAULT_PRIOR_CARRIER)


class ModelMismatchError(ValueError):
    """The model does not fit the System or Topology it is being added to."""


def bead_layout(topology: Any) -> tuple[list[str], list[str], np.ndarray]:
    """(bead names, residue name per bead, 0-based molecule index per bead) of an OpenMM CG Topology."""
    names, residues, molecules = [], [], []
    for atom in topology.atoms():
        names.append(atom.name)
        residues.append(atom.residue.name)
        molecules.append(atom.residue.index)
    return names, residues, np.unique(np.array(molecules, dtype=np.int64), return_inverse=True)[1].astype(np.int64)


class CGNNForce:
    """The forces of a trained CG model for one CG system (bead order fixed at construction).

    ``source`` is a model directory (``load_model``, then ``script_for_system`` for this system and
    temperature) or a scripted ``model.pt`` with metadata (checked against this system; a prior not
    inside it comes from the ``prior.json`` beside it). ``topology`` is a :class:`CGConfiguration` or an
    ``openmm.app.Topology`` whose atoms are the beads, named as in the mapping.

    ``prior``: "auto" (model directory: ``DEFAULT_PRIOR_CARRIER``, or the engine's own default when
    ``engine`` names one, ``DEFAULT_PRIOR_CARRIER_BY_ENGINE``; model.pt: as it was scripted),
    "openmm" (native forces), "model" (inside the TorchScript module) or "none" (network only).

    ``network=False`` is the ablation: the prior alone, as native forces, and no TorchForce (the
    prior-only CG model that shows what the network adds). It needs a prior outside the network.

    ``neighbor_skin_nm``: skin of the reused pair list, of the host-reading module (model
    directories, ``build_system_module``) or of the PythonForce engine (``engines.CompiledEnergy``);
    None: each one's default, 0: search afresh at every step.
    ``max_pairs_per_bead`` (model directories): the pair-list capacity; None: the model's.
    ``host_checks=False`` uses the graph-safe module on every platform (it is always used on CUDA).
    ``engine``: "auto" (the platform's default, chosen when the forces are added), "torch",
    "python" or a :class:`~openmm_cgnn.openmm.engines.ForceEngine`.

    ``constrain_bonds``: "none", "stiff" or "all" (``constraints.py``): those bonds become distance
    constraints of the System (added by :meth:`add_to`) and lose their prior terms. None: "none"
    for a model directory; a model.pt keeps the constraints it was scripted with (its metadata).

    Use: ``forces = CGNNForce(model_dir, cg_system, temperature=400); forces.add_to(system)``.
    """

    def __init__(
        self,
        source: str | Path,
        topology: CGConfiguration | Any,
        temperature: float | None = None,
        *,
        prior: str = "auto",
        host_checks: bool = True,
        prior_force_group: int = 1,
        model_force_group: int = 0,
        neighbor_skin_nm: float | None = None,
        max_pairs_per_bead: float | None = None,
        network: bool = True,
        engine: str | ForceEngine = "auto",
        constrain_bonds: str | None = None,
    ) -> None:
        if constrain_bonds is not None and constrain_bonds not in CONSTRAIN_BONDS:
            raise ValueError(f"constrain_bonds must be one of {CONSTRAIN_BONDS}, got {constrain_bonds!r}")
        self.constrain_bonds = constrain_bonds
        self.bond_constraints: list[BondConstraint] = []
        if prior not in PRIOR_CARRIERS:
            raise ValueError(f"prior must be one of {PRIOR_CARRIERS}, got {prior!r}")
        if isinstance(engine, str) and engine not in ("auto",) + ENGINES:
            raise ValueError(f"engine must be one of {('auto',) + ENGINES}, got {engine!r}")
        if not network:
            if prior not in ("auto", "openmm"):
                raise ValueError(f"the network switched off needs the prior as native forces (prior='openmm'), not {prior!r}")
            prior = "openmm"
        self.network = network
        self.engine_request = engine
        self.engine: ForceEngine | None = None if isinstance(engine, str) else engine
        self.source = Path(source)
        self.temperature = None if temperature is None else float(temperature)
        self.host_checks = host_checks
        self.neighbor_skin_nm = neighbor_skin_nm
        self.max_pairs_per_bead = max_pairs_per_bead
        self.prior_force_group = prior_force_group
        self.model_force_group = model_force_group
        self.cg = topology if isinstance(topology, CGConfiguration) else None
        self.topology = topology.topology() if isinstance(topology, CGConfiguration) else topology
        # model directories can build the module again: (host_checks, max_pairs_per_bead, scripted) -> module
        self._rescript: Callable[..., Any] | None = None
        self._engine_module: Any = None  # the module the engine runs when it is not self.module
        self.box = np.asarray(topology.box) if isinstance(topology, CGConfiguration) else _topology_box(self.topology)
        if self.source.is_dir():
            self._from_model_dir(prior)
        elif self.source.is_file():
            self._from_model_file(prior)
        else:
            raise ModelMismatchError(f"{self.source}: no model directory or model.pt there")
        if not network and self.prior is None:
            raise ModelMismatchError(f"{self.source}: the network switched off leaves no forces: "
                                     f"this model has no prior outside the network (prior carrier {self.prior_carrier!r})")
        self.check_topology(self.topology)
        self.torch_force: Any = None  # the network's force most recently added by add_to (any engine)
        self.force_index: int | None = None  # its index in that System
        self.cuda_graphs = False  # whether that force runs the graph-safe module with CUDA graphs
        self._system: Any = None
        self.cuda_graphs_report: dict[str, Any] | None = None

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, topology: CGConfiguration | Any, temperature: float | None = None, **kw: Any) -> "CGNNForce":
        if not Path(model_dir).is_dir():
            raise ModelMismatchError(f"{model_dir}: not a model directory")
        return cls(model_dir, topology, temperature, **kw)

    @classmethod
    def from_model_file(cls, model_pt: str | Path, topology: CGConfiguration | Any, temperature: float | None = None, **kw: Any) -> "CGNNForce":
        if not Path(model_pt).is_file():
            raise ModelMismatchError(f"{model_pt}: model file not found")
        return cls(model_pt, topology, temperature, **kw)

    def _cg_for_mapping(self, mapping: CGMapping) -> CGConfiguration:
        """The CG system: the one given, or the topology's beads checked against the mapping."""
        if self.cg is not None:
            if self.cg.mapping.sha256() != mapping.sha256():
                raise ModelMismatchError(f"{self.source}: the model's mapping.json differs from the CG system's mapping")
            return self.cg
        names, residues, molecules = bead_layout(self.topology)
        first = np.unique(molecules, return_index=True)[1]
        try:
            cg = CGConfiguration.from_molecules(mapping, [residues[i] for i in first], np.zeros((len(names), 3)), np.eye(3))
        except ValueError as exc:
            raise ModelMismatchError(f"{self.source}: the topology does not fit the model's mapping: {exc}") from None
        if cg.bead_names != names:
            k = next(i for i, (a, b) in enumerate(zip(cg.bead_names, names)) if a != b)
            raise ModelMismatchError(
                f"{self.source}: bead {k} is '{names[k]}' in the topology, the mapping puts '{cg.bead_names[k]}' there"
            )
        return cg

    def _from_model_dir(self, prior: str) -> None:
        from ..model import load_model, system_metadata
        from ..model.export import build_system_module

        model_dir = self.source
        mapping = CGMapping.load(model_dir / MAPPING_JSON)
        cg = self._cg_for_mapping(mapping)
        try:
            model = load_model(model_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise ModelMismatchError(str(exc)) from None
        names = model.config.bead_type_names
        if names is not None and list(names) != mapping.bead_type_names:
            raise ModelMismatchError(f"{model_dir}: the model's bead types {names} are not its mapping's {mapping.bead_type_names}")
        if model.config.use_temperature and self.temperature is None:
            raise ModelMismatchError(f"{model_dir}: this model takes the temperature as input; give the simulation temperature")
        if model.prior is None:
            if prior in ("openmm", "model"):
                raise ModelMismatchError(f"{model_dir}: prior={prior!r} asked for, but the model has no prior")
            carrier = "none"
        else:
            carrier = self.default_prior_carrier() if prior == "auto" else prior
        include = carrier == "model"
        self.prior_carrier = carrier
        self.prior = model.prior if carrier == "openmm" else None
        self._choose_constraints(model.prior, cg.bead_type, cg.molecule_index, cg.masses)

        def script(host_checks: bool, max_pairs_per_bead: float | None, scripted: bool = True) -> Any:
            try:
                module = build_system_module(model, cg.bead_type, cg.molecule_index, self.temperature,
                                             include_prior=include, box=self.box, host_checks=host_checks,
                                             neighbor_skin_nm=self.neighbor_skin_nm, max_pairs_per_bead=max_pairs_per_bead,
                                             skip_bonds=self.skip_bonds)
            except ValueError as exc:
                raise ModelMismatchError(f"{model_dir}: {exc}") from None
            return torch.jit.script(module) if scripted else module

        self._rescript = script
        self.module = script(self.host_checks, self.max_pairs_per_bead)
        self.metadata = system_metadata(model, cg.bead_type, cg.molecule_index, cg.bead_names, cg.masses, mapping.sha256(),
                                        self.temperature, include, host_checks=self.host_checks,
                                        graph_safe=not self.host_checks,
                                        neighbor_skin_nm=self.module.neighbor_skin_nm,
                                        filter_intervals=self.module.filter_intervals,
                                        max_pairs_per_bead=self.module.max_pairs_per_bead,
                                        **self._constraint_metadata())
        self.cg = cg
        self.bead_type, self.molecule_index = cg.bead_type, cg.molecule_index

    def default_prior_carrier(self) -> str:
        """Where "auto" puts a model directory's prior: the engine's measured choice when the engine is
        known now (asked for by name), else ``DEFAULT_PRIOR_CARRIER`` (:func:`auto_prior_carrier`)."""
        return auto_prior_carrier(str(self.engine.name if self.engine is not None else self.engine_request))

    def _from_model_file(self, prior: str) -> None:
        from ..model import read_metadata

        path = self.source
        try:
            self.metadata = read_metadata(path)
        except (FileNotFoundError, ValueError) as exc:
            raise ModelMismatchError(str(exc)) from None
        missing = [k for k in REQUIRED_METADATA if k not in self.metadata]
        if missing:
            raise ModelMismatchError(f"{path}: metadata.json lacks {missing}")
        try:
            self.module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise ModelMismatchError(f"{path}: not a loadable TorchScript model ({str(exc).splitlines()[0]})") from None
        meta = self.metadata
        if meta.get("uses_temperature"):
            if self.temperature is None:
                raise ModelMismatchError(f"{path}: this model takes the temperature as input; give the simulation temperature")
            if abs(float(meta["temperature_K"]) - self.temperature) > TEMPERATURE_TOLERANCE_K:
                raise ModelMismatchError(
                    f"{path}: scripted for {meta['temperature_K']} K but the simulation runs at {self.temperature} K; "
                    "export it again for this temperature (openmm-cgnn export --temperature) or use the model directory"
                )
        inside = bool(meta["includes_prior"])
        prior_path = path.with_name(PRIOR_JSON)
        if inside:
            if prior in ("openmm", "none"):
                raise ModelMismatchError(f"{path}: the prior is inside this model.pt; prior={prior!r} cannot take it out")
            carrier, self.prior = "model", None
        elif prior == "model":
            raise ModelMismatchError(f"{path}: prior='model' asked for, but this model.pt was scripted without its prior")
        elif prior == "none":
            carrier, self.prior = "none", None
        elif prior_path.exists():
            carrier, self.prior = "openmm", load_prior(prior_path, meta["bead_type_names"])
        else:
            raise ModelMismatchError(
                f"{path}: the model has no prior inside and there is no {prior_path.name} beside it; "
                "pass prior='none' if the model was trained without one"
            )
        self.prior_carrier = carrier
        _, _, molecules = bead_layout(self.topology)
        self.bead_type = np.asarray(meta["bead_type"], dtype=np.int64)
        self.molecule_index = molecules
        recorded = meta.get("constrain_bonds") or "none"
        if self.constrain_bonds is None or (inside and self.constrain_bonds == recorded):
            # the module was scripted without these bonds' terms: their constraints come with it
            try:
                self.bond_constraints = [BondConstraint.from_dict(c) for c in meta.get("constrained_bonds") or []]
            except ValueError as exc:
                raise ModelMismatchError(f"{path}: metadata.json {exc}") from None
            self.constrain_bonds = recorded
        elif inside:
            raise ModelMismatchError(f"{path}: scripted with its prior inside and --constrain-bonds {recorded}; "
                                     f"{self.constrain_bonds!r} needs the model directory (or an export made with it)")
        else:
            self._choose_constraints(self.prior, self.bead_type, molecules, meta["masses"])
        self.metadata.update(self._constraint_metadata())

    def _choose_constraints(self, prior: Any, bead_type: np.ndarray, molecule_index: np.ndarray, masses: Any) -> None:
        mode = self.constrain_bonds or "none"
        if mode != "none" and prior is None:
            raise ModelMismatchError(f"{self.source}: --constrain-bonds {mode} needs the model's prior (bond lengths "
                                     "and stiffnesses), and this model has none")
        self.constrain_bonds = mode
        self.bond_constraints = choose_bond_constraints(prior, bead_type, molecule_index, masses, mode)

    @property
    def skip_bonds(self) -> list[int]:
        """The prior's bond entries held by constraints (no bond term for them)."""
        return [c.entry for c in self.bond_constraints]

    def _constraint_metadata(self) -> dict[str, Any]:
        return {"constrain_bonds": self.constrain_bonds, "constrained_bonds": [c.as_dict() for c in self.bond_constraints]}

    def constraint_pairs(self) -> list[tuple[int, int, float]]:
        """(bead i, bead j, length nm) of every constraint :meth:`add_to` puts into the System."""
        _, residues, molecules = bead_layout(self.topology)
        try:
            return constraint_pairs(self.bond_constraints, residues, molecules)
        except ValueError as exc:
            raise ModelMismatchError(f"{self.source}: {exc}") from None

    def constraint_report(self) -> dict[str, Any]:
        """What summary.json records about the constraints."""
        return {**self._constraint_metadata(), "n_constraints": len(self.constraint_pairs())}

    # -- checks ---------------------------------------------------------------------------------

    def check_topology(self, topology: Any) -> None:
        """Bead count, names, types and molecules in the model's order; errors say where they first differ."""
        meta = self.metadata
        names, residues, molecules = bead_layout(topology)
        n = int(meta["n_beads"])
        if len(names) != n:
            raise ModelMismatchError(f"{self.source}: the model is for {n} beads, the topology has {len(names)}")
        if list(meta["bead_names"]) != names:
            k = next(i for i, (a, b) in enumerate(zip(meta["bead_names"], names)) if a != b)
            raise ModelMismatchError(
                f"{self.source}: bead {k} is '{names[k]}' in the topology but '{meta['bead_names'][k]}' in the model (bead order differs)"
            )
        type_names = list(meta["bead_type_names"])
        for k, (res, bead) in enumerate(zip(residues, names)):
            expected = type_names[int(meta["bead_type"][k])]
            if f"{res}:{bead}" != expected:
                raise ModelMismatchError(f"{self.source}: bead {k} is '{res}:{bead}' in the topology but '{expected}' in the model")
        if "molecule_index" in meta and not np.array_equal(np.asarray(meta["molecule_index"]), molecules):
            k = int(np.flatnonzero(np.asarray(meta["molecule_index"]) != molecules)[0])
            raise ModelMismatchError(f"{self.source}: bead {k} is in molecule {molecules[k]} in the topology, {meta['molecule_index'][k]} in the model")

    def check_system(self, system: Any) -> None:
        """Particle count, masses, and a periodic box that fits the model's cutoff."""
        meta = self.metadata
        n = int(meta["n_beads"])
        if system.getNumParticles() != n:
            raise ModelMismatchError(f"{self.source}: the model is for {n} beads, the System has {system.getNumParticles()} particles")
        masses = np.array([in_amu(system.getParticleMass(i)) for i in range(n)])
        diff = np.abs(masses - np.asarray(meta["masses"], dtype=float))
        if diff.max(initial=0.0) > MASS_TOLERANCE_AMU:
            k = int(diff.argmax())
            raise ModelMismatchError(
                f"{self.source}: particle {k} has mass {masses[k]:.4f} amu in the System, {meta['masses'][k]:.4f} amu in the model"
            )
        if meta.get("periodic", True):
            box = nm_array(system.getDefaultPeriodicBoxVectors())
            width = min_box_width(box)
            cutoff = max(float(meta.get("cutoff_inter_nm") or 0.0), float(meta.get("cutoff_intra_nm") or 0.0))
            if width < 2 * cutoff:
                raise ModelMismatchError(
                    f"{self.source}: the System's box is {width:.3f} nm across, less than twice the model cutoff "
                    f"({cutoff} nm); the minimum-image convention needs a larger box"
                )
        elif any(system.getForce(i).usesPeriodicBoundaryConditions() for i in range(system.getNumForces())):
            raise ModelMismatchError(f"{self.source}: the model is not periodic but the System has periodic forces")

    # -- forces ---------------------------------------------------------------------------------

    def resolve_engine(self, platform: Any = None, steps: int | None = None) -> ForceEngine:
        """The engine (chosen once: "auto" takes the platform's default for a run of ``steps``, see
        ``engines.default_engine``)."""
        if self.engine is None:
            name = platform if isinstance(platform, str) or platform is None else platform.getName()
            request = self.engine_request
            chosen = default_engine(name, steps) if request == "auto" else str(request)
            # the skin applies to whichever pair list the engine keeps (PythonForce: its own)
            self.engine = make_engine(chosen, **({"skin_nm": self.neighbor_skin_nm} if chosen == "python" else {}))
        return self.engine

    def engine_module(self, cuda_graphs: bool = False) -> tuple[Any, bool]:
        """(the module the engine runs, whether it runs with CUDA graphs).

        TorchForce: this binding's module, or with ``cuda_graphs`` the graph-safe one (falls back to
        the module as it is, graphs off, when there is none). PythonForce: the graph-safe plain
        module (model directories) or the model.pt's module, never graphs.
        """
        engine = self.resolve_engine()
        if engine.host_checks is False:
            if self._rescript is None:
                return self.module, False
            if self._engine_module is None:
                self._engine_module = engine.prepare(self._rescript(False, self.module.max_pairs_per_bead, scripted=False))
            return self._engine_module, False
        module = self.graph_safe_module() if cuda_graphs else None
        return (self.module if module is None else engine.prepare(module)), module is not None

    def _make_network_force(self, cuda_graphs: bool = False) -> Any:
        module, self.cuda_graphs = self.engine_module(cuda_graphs)
        return self.resolve_engine().build(module, bool(self.metadata.get("periodic", True)), self.model_force_group,
                                           self.cuda_graphs)

    def graph_safe_module(self) -> Any:
        """The module without host reads (CUDA graphs), or None where it cannot be had: a model.pt
        scripted as the host-reading variant cannot be scripted again."""
        if not getattr(self.module, "host_checks", self.metadata.get("host_checks", True)):
            return self.module
        if self._rescript is not None:
            return self._rescript(False, self.module.max_pairs_per_bead)
        return None

    def make_forces(self, cuda_graphs: bool = False) -> list[Any]:
        """New force objects: the network's force (its engine's), then any native prior forces.

        ``cuda_graphs`` (TorchForce): the graph-safe module with ``useCUDAGraphs=true`` (falls
        back to the module as it is, graphs off, when there is no graph-safe one).
        New on every call because a System takes ownership of the forces added to it.
        """
        extra = []
        if self.prior is not None:
            extra = prior_forces(self.prior, self.bead_type, self.molecule_index, self.metadata["bead_type_names"],
                                 self.prior_force_group, self.skip_bonds)
        if not self.network:  # the prior-only ablation
            self.cuda_graphs = False
            return extra
        return [self._make_network_force(cuda_graphs)] + extra

    def add_to(self, system: Any, platform: Any = None, *, cuda_graphs: bool | None = None,
               steps: int | None = None) -> list[int]:
        """Check ``system`` and add the forces to it, and the bond constraints; returns the forces'
        indices in the System (the network's first, also kept in ``force_index``).

        ``platform`` (an OpenMM Platform or its name) chooses the engine when it is "auto"; on
        "CUDA" TorchForce runs the graph-safe module with CUDA graphs. ``cuda_graphs`` overrides
        that choice (export writes it on).
        """
        self.check_system(system)
        name = platform if isinstance(platform, str) or platform is None else platform.getName()
        self.resolve_engine(name, steps)
        if cuda_graphs is None:
            cuda_graphs = name == "CUDA"
        forces = self.make_forces(cuda_graphs)
        self.torch_force = forces[0] if self.network else None
        self._system = system
        indices = [system.addForce(force) for force in forces]
        self.force_index = indices[0] if self.network else None
        add_constraints(system, self.constraint_pairs())
        return indices

    def engine_report(self) -> dict[str, Any]:
        """The engine and what it did (compilation, its time, the cache), for summary.json."""
        return self.resolve_engine().report()

    def save_model(self, path: str | Path) -> Path:
        """The scripted module with its metadata, as ``model.pt`` (written atomically)."""
        from ..model import save_scripted

        module = self.module if isinstance(self.module, torch.jit.ScriptModule) else torch.jit.script(self.module)
        return save_scripted(module, path, self.metadata)

    # -- errors ---------------------------------------------------------------------------------

    def diagnose(self, positions: Any, box: Any) -> Any:
        """Why the model gives NaN at ``positions`` (N x 3 nm) in ``box`` (3 x 3 nm): a
        :class:`~openmm_cgnn.model.export.Diagnosis`, or None for a model.pt without the method."""
        from ..model import diagnose

        return diagnose(self.module, nm_array(positions), nm_array(box))

    def explain(self, diagnosis: Any) -> str:
        """One line naming the cause of a NaN and the way out."""
        if diagnosis is None:
            return (f"{self.source} cannot say whether its input was at fault (it has no diagnose(): a model.pt from "
                    "an older export or another tool); try a smaller --dt-fs, more friction, or check the model")
        if not diagnosis.flags:
            return ("the model saw nothing wrong with the positions before the failure: the dynamics blew up "
                    "(forces too large for the time step); try a smaller --dt-fs, more friction, or check the model")
        text = diagnosis.message()
        if diagnosis.flags & FLAG_BOX_TOO_SMALL:
            text += "; the model needs a larger box: build the system with more molecules or at a lower density"
        elif diagnosis.flags & FLAG_NONFINITE:
            text += "; the structure handed to the model is broken (check the input, or an earlier step blew up)"
        elif diagnosis.pair_overflow:
            wanted = diagnosis.grown_max_pairs_per_bead()
            how = ("the runner regrows it automatically" if self.can_regrow else
                   f"export the model again with a larger max_pairs_per_bead (at least {wanted:g}), or simulate "
                   "from the model directory, which regrows the pair list by itself")
            text = (f"pair-list overflow: {diagnosis.count} intermolecular pairs within {diagnosis.cutoff_nm} nm, "
                    f"capacity {diagnosis.capacity} (max_pairs_per_bead {diagnosis.max_pairs_per_bead:g}); {how}")
        return "model input rejected: " + text

    @property
    def can_regrow(self) -> bool:
        """Whether the pair list can grow: model directories can be scripted again, a model.pt cannot."""
        return self._rescript is not None

    def regrow(self, system: Any, diagnosis: Any) -> float | None:
        """After a pair-list overflow: script the model again with room for the count seen and put
        it in ``system`` (Contexts made afterwards use it). Returns the new ``max_pairs_per_bead``,
        or None when the model cannot be scripted again (a model.pt) or nothing overflowed."""
        if diagnosis is None or not diagnosis.pair_overflow:
            return None
        return self.resize_pair_list(system, diagnosis.grown_max_pairs_per_bead())

    def resize_pair_list(self, system: Any, max_pairs_per_bead: float) -> float | None:
        """Script the model again with this pair-list capacity and put it in ``system`` (a resumed
        run takes back the capacity it had grown to). None for a model.pt (cannot be scripted again)."""
        if self._rescript is None:
            return None
        self.max_pairs_per_bead = float(max_pairs_per_bead)
        self.module = self._rescript(self.host_checks, self.max_pairs_per_bead)
        self._engine_module = None
        self.metadata["max_pairs_per_bead"] = self.max_pairs_per_bead
        if self.torch_force is not None:
            self._swap_network_force(system, self._make_network_force(self.cuda_graphs))
        return self.max_pairs_per_bead

    # -- CUDA graphs ----------------------------------------------------------------------------

    def _swap_network_force(self, system: Any, force: Any) -> None:
        """Put ``force`` in place of the network's force (found by its index, whatever its name)."""
        if self.force_index is not None and system is self._system:
            system.removeForce(self.force_index)
        self.force_index = system.addForce(force)
        self._system = system
        self.torch_force = force

    def tune_cuda_graphs(
        self,
        system: Any,
        positions: Any,
        platform: Any,
        properties: dict[str, str] | None = None,
        steps: int = 200,
        rtol: float = 1e-4,
    ) -> dict[str, Any]:
        """On CUDA, measure the graph-safe module with CUDA graphs (what :meth:`add_to` puts on
        CUDA) against the host-reading module without them, and keep the faster when they agree.

        Optional (benchmarks): call after :meth:`add_to` and before the simulation's Context is made
        (the TorchForce is read when a Context is created). Both modules have the same error
        semantics (NaN energy and forces on bad input).
        """
        import openmm

        report: dict[str, Any] = {"platform": platform.getName(), "use_cuda_graphs": False}
        self.cuda_graphs_report = report
        if platform.getName() != "CUDA":
            return report
        if self.torch_force is None:
            raise RuntimeError("tune_cuda_graphs() needs the forces added first (add_to)")
        if self.resolve_engine().name != "torch":
            report["reason"] = f"the {self.engine.name} engine has no CUDA graphs"
            return report
        graph_module = self.graph_safe_module()
        if graph_module is None:
            report["reason"] = "this model.pt holds the host-reading module, which CUDA graphs cannot capture"
            return report

        def measure() -> tuple[float, np.ndarray, float]:
            integrator = openmm.VerletIntegrator(0.001)
            context = openmm.Context(system, integrator, platform, properties or {})
            context.setPositions(positions)
            state = context.getState(getEnergy=True, getForces=True)
            energy = in_kj_mol(state.getPotentialEnergy())
            forces = np.asarray(in_kj_mol_nm(state.getForces(asNumpy=True)))
            integrator.step(20)  # warm-up: graphs are captured in the first steps
            context.getState(getEnergy=True)
            start = time.perf_counter()
            integrator.step(steps)
            context.getState(getEnergy=True)  # waits for the GPU
            return energy, forces, 1e3 * (time.perf_counter() - start) / steps

        self._swap_network_force(system, self._make_network_force())
        e_off, f_off, ms_off = measure()
        plain_force = self.torch_force
        self._swap_network_force(system, self._make_network_force(cuda_graphs=True))
        e_on, f_on, ms_on = measure()
        scale = max(float(np.abs(f_off).max()), 1.0)
        agree = abs(e_on - e_off) <= rtol * max(abs(e_off), 1.0) and float(np.abs(f_on - f_off).max()) <= rtol * scale
        use = bool(agree and ms_on < ms_off)
        self.cuda_graphs = use
        if not use:
            self._swap_network_force(system, self._make_network_force())
        del plain_force
        report.update(
            use_cuda_graphs=use,
            agree=bool(agree),
            ms_per_step_graphs_off=ms_off,
            ms_per_step_graphs_on=ms_on,
            energy_difference_kj_mol=float(e_on - e_off),
            max_force_difference_kj_mol_nm=float(np.abs(f_on - f_off).max()),
        )
        if not agree:
            report["warning"] = "CUDA graphs gave different energies/forces from graphs off; left off"
        return report


def _topology_box(topology: Any) -> np.ndarray | None:
    vectors = topology.getPeriodicBoxVectors()
    if vectors is None:
        return None
    return nm_array(vectors)


def min_box_width(box: np.ndarray) -> float:
    """Smallest distance between opposite faces of the (possibly triclinic) box."""
    box = np.asarray(box, dtype=float)
    volume = abs(np.linalg.det(box))
    return float(min(volume / np.linalg.norm(np.cross(box[(i + 1) % 3], box[(i + 2) % 3])) for i in range(3)))
