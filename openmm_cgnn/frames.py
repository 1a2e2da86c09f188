"""The frames file shared by all-atom and CG runs (``frames.h5``, docs/contracts.md section 1).

One format for both kinds of run means the mapping, training and evaluation stages read AA and CG
trajectories through one function. Frames are appended and flushed one at a time so that an
interrupted run keeps everything it wrote, and a resumed run continues the same file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .layout import FRAMES_H5

FORMAT = "openmm_cgnn.frames/1"


class FramesError(ValueError):
    """A frames file is missing, malformed, or does not hold what the caller needs."""


def _h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - part of the pinned stack
        raise ImportError("reading/writing frames needs h5py: pip install h5py") from exc
    return h5py


@dataclass
class TopologyInfo:
    """Per-particle topology of a run: atoms for AA runs, beads for CG runs."""

    atom_name: list[str]
    element: list[str]
    mass: np.ndarray  # (N,) amu
    residue_name: list[str]  # per particle
    residue_index: np.ndarray  # (N,) int, one residue = one molecule
    bonds: np.ndarray  # (B, 2) int
    pdb: str = ""

    def __post_init__(self) -> None:
        self.mass = np.asarray(self.mass, dtype=np.float64)
        self.residue_index = np.asarray(self.residue_index, dtype=np.int64)
        self.bonds = np.asarray(self.bonds, dtype=np.int64).reshape(-1, 2)
        n = len(self.atom_name)
        for name, value in (("element", self.element), ("mass", self.mass),
                            ("residue_name", self.residue_name), ("residue_index", self.residue_index)):
            if len(value) != n:
                raise FramesError(f"topology field '{name}' has {len(value)} entries, expected {n} (one per particle)")
        if self.bonds.size and (self.bonds.min() < 0 or self.bonds.max() >= n):
            raise FramesError(f"topology field 'bonds' refers to particles outside 0..{n - 1}")

    @property
    def n_particles(self) -> int:
        return len(self.atom_name)

    @property
    def n_residues(self) -> int:
        return int(self.residue_index.max()) + 1 if self.n_particles else 0

    def residue_atoms(self, residue: int) -> np.ndarray:
        """Particle indices of one residue, in file order."""
        return np.flatnonzero(self.residue_index == residue)

    def same_layout(self, other: "TopologyInfo") -> bool:
        return (
            self.atom_name == other.atom_name
            and self.residue_name == other.residue_name
            and np.array_equal(self.residue_index, other.residue_index)
        )

    @classmethod
    def from_openmm(cls, topology: Any, system: Any | None = None, positions: Any | None = None) -> "TopologyInfo":
        """Build from an ``openmm.app.Topology``; masses come from ``system`` when given (beads have no element)."""
        import openmm.app as app
        import openmm.unit as unit

        atoms = list(topology.atoms())
        if system is not None:
            mass = [system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(len(atoms))]
        else:
            mass = [a.element.mass.value_in_unit(unit.dalton) if a.element is not None else 0.0 for a in atoms]
        pdb = ""
        if positions is not None:
            import io

            buffer = io.StringIO()
            app.PDBFile.writeFile(topology, positions, buffer)
            pdb = buffer.getvalue()
        return cls(
            atom_name=[a.name for a in atoms],
            element=[a.element.symbol if a.element is not None else "" for a in atoms],
            mass=np.array(mass),
            residue_name=[a.residue.name for a in atoms],
            residue_index=np.array([a.residue.index for a in atoms]),
            bonds=np.array([(b[0].index, b[1].index) for b in topology.bonds()], dtype=np.int64).reshape(-1, 2),
            pdb=pdb,
        )


@dataclass
class Frames:
    """Frames read from a ``frames.h5`` (see :func:`read_frames`)."""

    positions: np.ndarray  # (F, N, 3) nm, unwrapped
    box: np.ndarray  # (F, 3, 3) nm
    time: np.ndarray  # (F,) ps
    topology: TopologyInfo
    metadata: dict[str, Any]
    forces: np.ndarray | None = None  # (F, N, 3) kJ/mol/nm
    potential_energy: np.ndarray | None = None  # (F,) kJ/mol
    path: Path | None = field(default=None, repr=False)

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def temperature_K(self) -> float:
        if "temperature_K" not in self.metadata:
            raise FramesError(f"{self.path}: metadata has no 'temperature_K'")
        return float(self.metadata["temperature_K"])

    @property
    def kind(self) -> str:
        return str(self.metadata.get("kind", "aa"))


def resolve_frames_path(path_or_dir: str | Path) -> Path:
    """Accept a run directory or the ``frames.h5`` inside it."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / FRAMES_H5
    if not path.exists():
        raise FramesError(f"{path}: no frames file (expected a run directory containing {FRAMES_H5})")
    return path


class FrameWriter:
    """Append frames to ``frames.h5``, flushing after each so an interruption loses nothing written.

    With ``resume=True`` an existing file is reopened and its topology checked; new frames follow
    the ones already there (``n_frames`` says how many, so the caller can skip what is done).
    """

    def __init__(
        self,
        path: str | Path,
        topology: TopologyInfo,
        metadata: dict[str, Any],
        with_forces: bool = True,
        resume: bool = False,
    ) -> None:
        h5py = _h5py()
        self.path = Path(path)
        self.with_forces = with_forces
        n = topology.n_particles
        if resume and self.path.exists():
            self._file = h5py.File(self.path, "a")
            self._check_resumable(topology, with_forces)
            return
        if self.path.exists():
            raise FramesError(f"{self.path}: already exists (resume it or choose another output)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self._file = h5py.File(self.path, "w")
        f.attrs["format"] = FORMAT
        f.attrs["metadata"] = json.dumps(metadata, sort_keys=True, default=str)
        chunk = (1, n, 3)
        f.create_dataset("positions", (0, n, 3), maxshape=(None, n, 3), dtype="f4", chunks=chunk)
        if with_forces:
            f.create_dataset("forces", (0, n, 3), maxshape=(None, n, 3), dtype="f4", chunks=chunk)
        f.create_dataset("box", (0, 3, 3), maxshape=(None, 3, 3), dtype="f4", chunks=(64, 3, 3))
        f.create_dataset("time", (0,), maxshape=(None,), dtype="f8", chunks=(256,))
        f.create_dataset("potential_energy", (0,), maxshape=(None,), dtype="f8", chunks=(256,))
        top = f.create_group("topology")
        text = h5py.string_dtype()
        top.create_dataset("atom_name", data=np.array(topology.atom_name, dtype=object), dtype=text)
        top.create_dataset("element", data=np.array(topology.element, dtype=object), dtype=text)
        top.create_dataset("mass", data=topology.mass)
        top.create_dataset("residue_name", data=np.array(topology.residue_name, dtype=object), dtype=text)
        top.create_dataset("residue_index", data=topology.residue_index.astype(np.int32))
        top.create_dataset("bonds", data=topology.bonds.astype(np.int32).reshape(-1, 2))
        top.create_dataset("pdb", data=topology.pdb, dtype=text)
        f.flush()

    def _check_resumable(self, topology: TopologyInfo, with_forces: bool) -> None:
        existing = _read_topology(self._file, self.path)
        if not existing.same_layout(topology):
            self._file.close()
            raise FramesError(f"{self.path}: cannot resume, its topology differs from this run's")
        if with_forces and "forces" not in self._file:
            self._file.close()
            raise FramesError(f"{self.path}: cannot resume with forces, the file has none")

    @property
    def n_frames(self) -> int:
        return int(self._file["positions"].shape[0])

    def append(
        self,
        positions: np.ndarray,
        box: np.ndarray,
        time: float,
        forces: np.ndarray | None = None,
        potential_energy: float = float("nan"),
    ) -> None:
        f = self._file
        if self.with_forces and forces is None:
            raise FramesError(f"{self.path}: this file stores forces; append() got none")
        names = ["positions", "box", "time", "potential_energy"] + (["forces"] if self.with_forces else [])
        # one lookup per dataset and frame: h5py's name lookups cost more than writing a small frame
        data = {name: f[name] for name in names}
        k = int(data["positions"].shape[0])
        for name in names:
            data[name].resize(k + 1, axis=0)
        data["positions"][k] = np.asarray(positions, dtype=np.float32)
        data["box"][k] = np.asarray(box, dtype=np.float32)
        data["time"][k] = time
        data["potential_energy"][k] = potential_energy
        if self.with_forces:
            data["forces"][k] = np.asarray(forces, dtype=np.float32)
        f.flush()

    def truncate(self, n_frames: int) -> None:
        """Drop frames past ``n_frames`` (a resumed run rewinding to its last checkpoint)."""
        for name in ("positions", "box", "time", "potential_energy", "forces"):
            if name in self._file and self._file[name].shape[0] > n_frames:
                self._file[name].resize(n_frames, axis=0)
        self._file.flush()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> "FrameWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_topology(f: Any, path: Path) -> TopologyInfo:
    if "topology" not in f:
        raise FramesError(f"{path}: no 'topology' group")
    top = f["topology"]

    def strings(name: str) -> list[str]:
        if name not in top:
            raise FramesError(f"{path}: topology has no '{name}' field")
        return [s.decode() if isinstance(s, bytes) else str(s) for s in top[name][()]]

    pdb = top["pdb"][()] if "pdb" in top else ""
    return TopologyInfo(
        atom_name=strings("atom_name"),
        element=strings("element"),
        mass=np.asarray(top["mass"][()]),
        residue_name=strings("residue_name"),
        residue_index=np.asarray(top["residue_index"][()]),
        bonds=np.asarray(top["bonds"][()]),
        pdb=pdb.decode() if isinstance(pdb, bytes) else str(pdb),
    )


def read_topology(path_or_dir: str | Path) -> TopologyInfo:
    path = resolve_frames_path(path_or_dir)
    with _h5py().File(path, "r") as f:
        return _read_topology(f, path)


def evenly_spaced(n_frames: int, max_frames: int) -> np.ndarray:
    """Sorted indices of at most ``max_frames`` frames spread evenly over ``range(n_frames)``."""
    return np.unique(np.linspace(0, n_frames - 1, min(n_frames, max_frames)).round().astype(int))


def count_frames(path_or_dir: str | Path) -> int:
    """Number of frames in a frames file, without reading them (for reading a long run in chunks)."""
    path = resolve_frames_path(path_or_dir)
    with _h5py().File(path, "r") as f:
        if "positions" not in f:
            raise FramesError(f"{path}: missing dataset 'positions'")
        return int(f["positions"].shape[0])


def read_frames(
    path_or_dir: str | Path,
    start: int = 0,
    stop: int | None = None,
    stride: int = 1,
    require_forces: bool = False,
    max_frames: int | None = None,
) -> Frames:
    """Read frames ``start:stop:stride``; errors name the file and the missing or bad field.

    ``max_frames`` keeps at most that many frames of the range, evenly spaced over it (so a
    time-block split still spans the whole run), and reads only those from disk.
    """
    path = resolve_frames_path(path_or_dir)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FramesError(f"{path}: not a readable HDF5 frames file ({exc})") from exc
    with f:
        if f.attrs.get("format") != FORMAT:
            raise FramesError(f"{path}: format is {f.attrs.get('format')!r}, expected {FORMAT!r}")
        for name in ("positions", "box", "time"):
            if name not in f:
                raise FramesError(f"{path}: missing dataset '{name}'")
        try:
            metadata = json.loads(f.attrs.get("metadata", "{}"))
        except json.JSONDecodeError as exc:
            raise FramesError(f"{path}: attribute 'metadata' is not valid JSON ({exc})") from exc
        has_forces = "forces" in f and f["forces"].shape[0] == f["positions"].shape[0]
        if require_forces and not has_forces:
            raise FramesError(f"{path}: the run saved no forces, which this step needs (dataset 'forces')")
        sl: slice | np.ndarray = slice(start, stop, stride)
        if max_frames is not None:
            in_range = np.arange(f["positions"].shape[0])[sl]
            if in_range.size > max_frames:
                sl = in_range[evenly_spaced(in_range.size, max_frames)]
        frames = Frames(
            positions=np.asarray(f["positions"][sl]),
            box=np.asarray(f["box"][sl]),
            time=np.asarray(f["time"][sl]),
            topology=_read_topology(f, path),
            metadata=metadata,
            forces=np.asarray(f["forces"][sl]) if has_forces else None,
            potential_energy=np.asarray(f["potential_energy"][sl]) if "potential_energy" in f else None,
            path=path,
        )
    if frames.n_frames == 0:
        raise FramesError(f"{path}: holds no frames in the range {start}:{stop}:{stride}")
    n = frames.topology.n_particles
    if frames.positions.shape[1:] != (n, 3):
        raise FramesError(f"{path}: 'positions' has shape {frames.positions.shape}, expected (F, {n}, 3)")
    if not np.isfinite(frames.positions).all():
        raise FramesError(f"{path}: 'positions' contains NaN or infinite values")
    return frames
