"""Learn a CG mapping from all-atom frames: per residue type, several CGAE restarts, best one kept.

Every molecule of a residue type in every frame is one sample, made whole across the periodic
boundary and centred on its centre of mass. Inside this module a residue's atoms are handled in
*sorted-name* order, so the result does not depend on the order of atoms in the input files
(permuting them permutes the mapping and nothing else); the mapping is written in the file order.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..frames import Frames
from ..progress import progress_bar
from .cgae import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_RHO, CGAEConfig, evaluate_assignment, train_cgae
from .discretize import DiscretizationError, atom_groups, beads_by_first_atom, discretize, is_hydrogen
from .spec import CGMapping, MappingError, ResidueMapping, make_molecules_whole

DEFAULT_RESTARTS = 3
DEFAULT_MAX_SAMPLES = 2048


class BeadCountError(MappingError):
    """The requested bead counts do not fit the residues in the data."""


@dataclass
class ResidueTemplate:
    """One residue type, atoms in sorted-name (canonical) order; ``file_order`` restores the file's."""

    name: str
    atoms: list[str]
    elements: list[str]
    masses: np.ndarray
    bonds: np.ndarray  # (B, 2) canonical atom indices
    file_order: list[str]  # atom names in the order of the first file
    source: str

    @property
    def n_atoms(self) -> int:
        return len(self.atoms)

    def n_groups(self) -> int:
        hydrogen = [is_hydrogen(e, m) for e, m in zip(self.elements, self.masses)]
        return int(atom_groups(self.n_atoms, self.bonds, hydrogen).max()) + 1

    def same_as(self, other: "ResidueTemplate") -> bool:
        return (
            self.atoms == other.atoms
            and self.elements == other.elements
            and np.allclose(self.masses, other.masses)
            and {tuple(sorted(b)) for b in self.bonds.tolist()} == {tuple(sorted(b)) for b in other.bonds.tolist()}
        )


def residue_templates(frames: Frames) -> "OrderedDict[str, tuple[ResidueTemplate, np.ndarray]]":
    """Residue types in order of first appearance, each with its molecules' atom indices (K, n), canonical order."""
    top = frames.topology
    source = str(frames.path)
    order = np.argsort(top.residue_index, kind="stable")
    bounds = np.flatnonzero(np.diff(top.residue_index[order])) + 1
    found: "OrderedDict[str, tuple[ResidueTemplate, list[np.ndarray]]]" = OrderedDict()
    for atoms in np.split(order, bounds):
        if atoms.size == 0:
            continue
        name = top.residue_name[atoms[0]]
        names = [top.atom_name[i] for i in atoms]
        if name not in found:
            if len(set(names)) != len(names):
                raise MappingError(f"{source}: residue '{name}' has duplicate atom names; a mapping needs unique names")
            canon = sorted(range(len(names)), key=lambda k: names[k])
            index = atoms[canon]
            local = {int(a): k for k, a in enumerate(index)}
            bonds = [(local[i], local[j]) for i, j in top.bonds.tolist() if i in local and j in local]
            template = ResidueTemplate(
                name=name,
                atoms=[names[k] for k in canon],
                elements=[top.element[i] for i in index],
                masses=top.mass[index].astype(np.float64),
                bonds=np.array(bonds, dtype=np.int64).reshape(-1, 2),
                file_order=names,
                source=source,
            )
            found[name] = (template, [index])
            continue
        template, molecules = found[name]
        if sorted(names) != template.atoms:
            raise MappingError(
                f"{source}: molecules of residue '{name}' differ (residue index {int(top.residue_index[atoms[0]])} "
                f"has atoms {sorted(names)}, the first one {template.atoms})"
            )
        by_name = dict(zip(names, atoms))
        molecules.append(np.array([by_name[a] for a in template.atoms]))
    return OrderedDict((name, (t, np.stack(m))) for name, (t, m) in found.items())


def check_bead_counts(templates: Mapping[str, ResidueTemplate], beads_per_residue: Mapping[str, int]) -> None:
    present = ", ".join(f"{n} ({t.n_atoms} atoms)" for n, t in templates.items())
    unknown = [name for name in beads_per_residue if name not in templates]
    if unknown:
        raise BeadCountError(f"residue(s) {', '.join(unknown)} not in the data; residues present: {present}")
    missing = [name for name in templates if name not in beads_per_residue]
    if missing:
        raise BeadCountError(
            f"no bead count for residue(s) {', '.join(missing)}; give one for every residue present: {present}"
        )
    for name, count in beads_per_residue.items():
        template = templates[name]
        if not isinstance(count, (int, np.integer)) or count < 1:
            raise BeadCountError(f"residue '{name}': bead count must be a positive integer, got {count!r}")
        if count > template.n_atoms:
            raise BeadCountError(f"residue '{name}': {count} beads requested but it has only {template.n_atoms} atoms")
        if count > template.n_groups():
            raise BeadCountError(
                f"residue '{name}': {count} beads requested but it has only {template.n_groups()} heavy atoms "
                "(each hydrogen stays with its heavy atom)"
            )


def collect_samples(
    frames_list: Sequence[Frames], max_samples: int | None = DEFAULT_MAX_SAMPLES, seed: int = 0
) -> "OrderedDict[str, tuple[ResidueTemplate, np.ndarray, np.ndarray]]":
    """Per residue type: template, centred whole-molecule positions (S, n, 3) and forces (S, n, 3)."""
    if not frames_list:
        raise MappingError("no frames given to learn a mapping from")
    samples: "OrderedDict[str, tuple[ResidueTemplate, list[np.ndarray], list[np.ndarray]]]" = OrderedDict()
    for frames in frames_list:
        if frames.forces is None:
            raise MappingError(f"{frames.path}: the run saved no forces (dataset 'forces'); the mapping's force term needs them")
        if frames.kind != "aa":
            raise MappingError(f"{frames.path}: metadata 'kind' is {frames.kind!r}; a mapping is learned from all-atom ('aa') runs")
        templates = residue_templates(frames)
        first = next(iter(samples.values()))[0] if samples else None
        if first is not None and set(templates) != set(samples):
            raise MappingError(
                f"{frames.path}: residue types {list(templates)} differ from {first.source}'s {list(samples)}"
            )
        top = frames.topology
        whole = make_molecules_whole(frames.positions, frames.box, top.residue_index, top.bonds)
        for name, (template, index) in templates.items():
            if name in samples and not samples[name][0].same_as(template):
                raise MappingError(
                    f"{frames.path}: residue '{name}' has a different topology (atoms, elements, masses or bonds) "
                    f"from {samples[name][0].source}"
                )
            pos = whole[:, index].reshape(-1, template.n_atoms, 3)
            com = np.einsum("sna,n->sa", pos, template.masses) / template.masses.sum()
            frc = frames.forces[:, index].reshape(-1, template.n_atoms, 3)
            entry = samples.setdefault(name, (template, [], []))
            entry[1].append((pos - com[:, None, :]).astype(np.float32))
            entry[2].append(frc.astype(np.float32))
    rng = np.random.default_rng(seed)
    out: "OrderedDict[str, tuple[ResidueTemplate, np.ndarray, np.ndarray]]" = OrderedDict()
    for name, (template, pos_parts, frc_parts) in samples.items():
        pos, frc = np.concatenate(pos_parts), np.concatenate(frc_parts)
        if not (np.isfinite(pos).all() and np.isfinite(frc).all()):
            raise MappingError(f"residue '{name}': positions or forces contain NaN or inf")
        if max_samples is not None and len(pos) > max_samples:
            keep = np.sort(rng.choice(len(pos), size=max_samples, replace=False))
            pos, frc = pos[keep], frc[keep]
        out[name] = (template, pos, frc)
    return out


def learn_residue(
    template: ResidueTemplate,
    positions: np.ndarray,
    forces: np.ndarray,
    n_beads: int,
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    restarts: int = DEFAULT_RESTARTS,
    device: str = "cpu",
    rho: float = DEFAULT_RHO,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tie_hydrogens: bool = True,
    log: Callable[[str], None] = lambda message: None,
    progress: bool = False,
) -> tuple[ResidueMapping, dict[str, Any]]:
    """Train ``restarts`` CGAEs (seeds ``seed``, ``seed+1``, ...) and keep the discrete map with the lowest loss.

    A restart whose assignment cannot be repaired into a valid map is logged and replaced by another
    seed, up to ``restarts`` extra tries.
    """
    hydrogen = [is_hydrogen(e, m) for e, m in zip(template.elements, template.masses)]
    groups = atom_groups(template.n_atoms, template.bonds, hydrogen) if tie_hydrogens else None
    runs: list[dict[str, Any]] = []
    best: tuple[float, np.ndarray, dict[str, Any]] | None = None
    tries = 0
    if n_beads == 1:
        # One bead has exactly one map: nothing to learn, only its losses to report.
        assignment = np.zeros(template.n_atoms, dtype=np.int64)
        scores = evaluate_assignment(positions, forces, template.masses, assignment, rho)
        record = {"seed": None, "valid": True, "discrete": scores, "repairs": [], "note": "single bead: no training needed"}
        best = (scores["loss"], assignment, {"probabilities": np.ones((template.n_atoms, 1)), "record": record})
        log(f"{template.name}: single bead, nothing to train; loss {scores['loss']:.4f} (rec {scores['rec']:.4f}, inst {scores['inst']:.4f})")
        restarts = 0
    while sum(r["valid"] for r in runs) < restarts and tries < 2 * restarts:
        run_seed = seed + tries
        tries += 1
        config = CGAEConfig(n_beads=n_beads, epochs=epochs, batch_size=batch_size, rho=rho, seed=run_seed, device=device)
        try:
            # a bar on a terminal, plain lines in a log (openmm_cgnn.progress)
            with progress_bar(epochs, desc=f"{template.name} seed {run_seed}", unit="epoch", disable=not progress) as bar:
                result = train_cgae(positions, forces, template.masses, config, atom_group=groups,
                                    on_epoch=lambda: bar.update(1))
        except FloatingPointError as exc:
            runs.append({"seed": run_seed, "valid": False, "error": str(exc), "history": {}})
            log(f"{template.name}: seed {run_seed}: {exc}; retraining with another seed")
            continue
        record: dict[str, Any] = {**result.summary(), "history": result.history}
        try:
            assignment, repairs = discretize(result.probabilities, template.bonds, template.elements, template.masses, template.atoms)
        except DiscretizationError as exc:
            record.update(valid=False, error=str(exc))
            log(f"{template.name}: seed {run_seed}: no valid map ({exc}); retraining with another seed")
            runs.append(record)
            continue
        scores = evaluate_assignment(positions, forces, template.masses, assignment, rho)
        record.update(valid=True, discrete=scores, repairs=repairs)
        runs.append(record)
        log(
            f"{template.name}: seed {run_seed}: loss {scores['loss']:.4f} (rec {scores['rec']:.4f}, inst {scores['inst']:.4f})"
            f" in {result.seconds:.1f} s" + (f"; repairs: {'; '.join(repairs)}" if repairs else "")
        )
        # Restarts that find the same map tie up to rounding: keep the earlier seed then.
        if best is None or scores["loss"] < best[0] - 1e-9 * abs(best[0]):
            best = (scores["loss"], assignment, {"probabilities": result.probabilities, "record": record})
    if best is None:
        raise MappingError(f"residue '{template.name}': no restart gave a valid {n_beads}-bead map (tried {tries} seeds)")
    _, assignment, chosen = best
    # Back to the file's atom order; beads numbered by their first atom there.
    position = {name: k for k, name in enumerate(template.atoms)}
    file_index = [position[name] for name in template.file_order]
    file_assignment, column_of_bead = beads_by_first_atom(assignment[file_index])
    file_masses = template.masses[file_index]
    file_bonds = [(file_index.index(i), file_index.index(j)) for i, j in template.bonds.tolist()]
    residue = ResidueMapping.from_assignment(template.file_order, file_assignment, file_masses, file_bonds)
    probabilities = chosen["probabilities"][file_index][:, column_of_bead]
    record = chosen["record"]
    report = {
        "n_atoms": template.n_atoms,
        "n_beads": n_beads,
        "n_samples": int(len(positions)),
        "chosen_seed": record["seed"],
        "final": record["discrete"],
        "repairs": record["repairs"],
        "beads": {bead.name: bead.atoms for bead in residue.beads},
        "atoms": template.file_order,
        "probabilities": np.round(probabilities, 5).tolist(),
        "restarts": runs,
    }
    return residue, report


def learn_mapping(
    frames_list: Sequence[Frames],
    beads_per_residue: Mapping[str, int],
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    restarts: int = DEFAULT_RESTARTS,
    device: str = "cpu",
    rho: float = DEFAULT_RHO,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    tie_hydrogens: bool = True,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> tuple[CGMapping, dict[str, Any]]:
    """Learn a mapping for every residue type in ``frames_list`` (AA frames with forces).

    ``beads_per_residue`` must name every residue type present (no silent defaults). Returns the
    mapping (its ``training`` field holds a short summary) and a report with losses, chosen seeds,
    repairs, loss histories and the soft assignment of every residue type.
    """
    log = log or (lambda message: None)
    if epochs < 1 or restarts < 1 or batch_size < 1:
        raise MappingError(f"epochs, restarts and batch_size must be >= 1 (got {epochs}, {restarts}, {batch_size})")
    if rho < 0:
        raise MappingError(f"rho must be >= 0, got {rho}")
    started = time.perf_counter()
    if not frames_list:
        raise MappingError("no frames given to learn a mapping from")
    # Bead counts are checked on the first run's residues before any costly preparation.
    check_bead_counts(OrderedDict((n, t) for n, (t, _) in residue_templates(frames_list[0]).items()), beads_per_residue)
    samples = collect_samples(frames_list, max_samples=max_samples, seed=seed)
    residues: "OrderedDict[str, ResidueMapping]" = OrderedDict()
    residue_reports: dict[str, Any] = {}
    for name, (template, positions, forces) in samples.items():
        log(f"{name}: {len(positions)} samples, {template.n_atoms} atoms -> {beads_per_residue[name]} beads")
        residues[name], residue_reports[name] = learn_residue(
            template, positions, forces, int(beads_per_residue[name]),
            epochs=epochs, seed=seed, restarts=restarts, device=device, rho=rho,
            batch_size=batch_size, tie_hydrogens=tie_hydrogens, log=log, progress=progress,
        )
    settings = {"epochs": epochs, "seed": seed, "restarts": restarts, "rho": rho, "batch_size": batch_size,
                "max_samples": max_samples, "tie_hydrogens": tie_hydrogens, "device": device}
    report = {
        "settings": settings,
        "sources": [str(f.path) for f in frames_list],
        "residues": residue_reports,
        "seconds": round(time.perf_counter() - started, 2),
    }
    training = {
        "method": "CGAE (Gumbel-softmax encoder, linear decoder, loss = rec + rho * inst)",
        **settings,
        "residues": {n: {"chosen_seed": r["chosen_seed"], "final": r["final"], "repairs": r["repairs"]}
                     for n, r in residue_reports.items()},
    }
    return CGMapping(residues=residues, training=training), report
