"""Force-field export: a self-contained directory that plain OpenMM loads without ``openmm_cgnn``.

``EXPORTDIR/`` holds ``system.xml`` (the whole CG System: TorchForce with the graph-safe scripted
module embedded and ``useCUDAGraphs=true``, native prior forces, masses, box), ``cg.pdb`` (one
configuration with its box), ``model.pt`` (the host-reading TorchScript module, fastest on the CPU
and Reference platforms, with its metadata), ``mapping.json``, ``prior.json``,
``metadata.json``, ``cg.psf``/``cg.gro``/``cg.top`` (topology only, written with ParmEd for
visualisation and analysis tools) and a ``README.md`` saying how to load it from Python and C++.

The directory is built next to its destination and renamed into place, so an existing export is
never left half-replaced; before it is renamed, ``system.xml`` and ``cg.pdb`` are read back with
plain OpenMM and must reproduce the energy of the System they were written from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..io import OutputDirError, check_output_dir, staging_dir, swap_in, write_marker
from ..layout import CG_PDB, MAPPING_JSON, MARKER, METADATA_JSON, MODEL_PT, PRIOR_JSON, README_MD, SYSTEM_XML
from ..platforms import PlatformError, get_platform, platform_properties, versions
from ..units import in_kj_mol, in_nm
from .force import CGNNForce
from .topology import CGConfiguration

EXPORT_FORMAT = "openmm_cgnn.export/1"
ROUND_TRIP_RTOL = 1e-9


class ExportError(RuntimeError):
    """The export cannot be written (destination exists, round trip failed)."""


def export_forcefield(
    model_dir: str | Path,
    cg: CGConfiguration,
    out_dir: str | Path,
    temperature: float | None = None,
    prior: str = "auto",
    overwrite: bool = False,
    minimize: bool = False,
    log: Any = print,
    platform: str = "Reference",
    constrain_bonds: str | None = None,
) -> Path:
    """Write the export directory for the model in ``model_dir`` applied to the CG system ``cg``.

    ``temperature`` is required for models that take 1/T (it is baked into the scripted model);
    ``minimize`` relaxes ``cg`` in the force field first (for packed starting structures).
    ``platform`` runs that minimisation and the round-trip check: Reference by default; on a machine
    whose openmm-torch has only its CUDA kernels (a torch ABI other than the pinned one), CUDA.
    ``constrain_bonds`` (``CGNNForce``): the constraints go into system.xml, their bonds' prior
    terms leave both carriers, and model.pt's metadata lists them.
    """
    import openmm

    out = Path(out_dir)
    # Only an export directory is ever replaced (io.check_output_dir): never the model it comes from.
    try:
        check_output_dir(out, "export", overwrite=overwrite)
    except OutputDirError as exc:
        raise ExportError(str(exc)) from None
    try:
        check_platform = get_platform(platform, "--platform")
    except PlatformError as exc:
        raise ExportError(str(exc)) from None
    force = CGNNForce(model_dir, cg, temperature, prior=prior, engine="torch",  # system.xml needs TorchForce
                      constrain_bonds=constrain_bonds)
    system = cg.system()
    # the graph-safe module with CUDA graphs: no host reads, so it runs on every platform (the
    # property only matters on CUDA), and bad input gives NaN there as everywhere
    force.add_to(system, cuda_graphs=True)
    if minimize:
        cg = _minimized(system, cg, log, check_platform)

    staging = staging_dir(out)
    try:
        write_marker(staging, "export")
        force.save_model(staging / MODEL_PT)
        (staging / SYSTEM_XML).write_text(openmm.XmlSerializer.serialize(system))
        cg.write_pdb(staging / CG_PDB)
        cg.mapping.save(staging / MAPPING_JSON)
        prior_set = _model_prior(force, model_dir)
        if prior_set is not None:
            prior_set.to_json(staging / PRIOR_JSON)
        topology_files = write_parmed_topology(cg, staging)
        check = round_trip_check(system, staging, check_platform)
        metadata = {
            "format": EXPORT_FORMAT,
            "source_model_dir": str(Path(model_dir).resolve()),
            "temperature_K": temperature,
            "prior_carrier": force.prior_carrier,
            **force.constraint_report(),  # constrain_bonds, constrained_bonds, n_constraints
            "n_beads": cg.n_beads,
            "composition": cg.composition(),
            "box_nm": np.asarray(cg.box).tolist(),
            "density_kg_m3": cg.density_kg_m3(),
            "forces": [
                {"name": system.getForce(i).getName(), "class": _force_class(system.getForce(i)),
                 "force_group": system.getForce(i).getForceGroup()}
                for i in range(system.getNumForces())
            ],
            "files": sorted(p.name for p in staging.iterdir() if p.name != MARKER) + [METADATA_JSON, README_MD],
            "topology_files": topology_files,
            "round_trip_check": check,
            "system_xml_module": {"graph_safe": True, "useCUDAGraphs": force.cuda_graphs,
                                  "max_pairs_per_bead": force.module.max_pairs_per_bead},
            "versions": versions(),
            "model": force.metadata,
        }
        (staging / METADATA_JSON).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        (staging / README_MD).write_text(readme_text(metadata))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, out)
    return out


def _force_class(force: Any) -> str:
    # plugin forces come back from System.getForce as the base class; their name says what they are
    name = type(force).__name__
    return "TorchForce (openmm-torch)" if force.getName() == "CGNNForce" else name


def _model_prior(force: CGNNForce, model_dir: str | Path) -> Any:
    """The PriorSet to ship as prior.json (also when it runs inside the model, for reference)."""
    if force.prior is not None:
        return force.prior
    path = Path(model_dir) / PRIOR_JSON
    if Path(model_dir).is_dir() and path.exists():
        from .prior_forces import load_prior

        return load_prior(path, force.metadata["bead_type_names"])
    return None


def _minimized(system: Any, cg: CGConfiguration, log: Any, platform: Any) -> CGConfiguration:
    import openmm

    context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform, platform_properties(platform))
    context.setPositions(cg.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 2000)
    state = context.getState(getPositions=True, getEnergy=True)
    positions = np.asarray(in_nm(state.getPositions(asNumpy=True)))
    if not np.isfinite(positions).all():
        raise ExportError("energy minimisation of the packed structure gave NaN positions")
    log(f"minimised the packed structure: {in_kj_mol(state.getPotentialEnergy()):.1f} kJ/mol")
    return cg.with_positions(positions)


def round_trip_check(system: Any, folder: Path, platform: Any = None) -> dict[str, Any]:
    """Energies of the in-memory System and of system.xml + cg.pdb read back must agree (on ``platform``,
    default Reference)."""
    import openmm
    import openmm.app as app

    pdb = app.PDBFile(str(folder / CG_PDB))
    loaded = openmm.XmlSerializer.deserialize((folder / SYSTEM_XML).read_text())
    energies = []
    for candidate in (system, loaded):
        platform = platform or get_platform("Reference", check=False)
        context = openmm.Context(candidate, openmm.VerletIntegrator(0.001), platform, platform_properties(platform))
        context.setPositions(pdb.positions)
        energies.append(in_kj_mol(context.getState(getEnergy=True).getPotentialEnergy()))
        del context
    original, reloaded = energies
    if not abs(original - reloaded) <= ROUND_TRIP_RTOL * max(abs(original), 1.0):
        raise ExportError(f"system.xml read back gives {reloaded} kJ/mol, the System {original} kJ/mol")
    return {"platform": platform.getName(), "potential_energy_kj_mol": original, "reloaded_potential_energy_kj_mol": reloaded}


def write_parmed_topology(cg: CGConfiguration, folder: Path) -> list[str]:
    """PSF, GRO and a GROMACS TOP with the beads (types RES_BEAD, masses, bonds); no potential in them."""
    import parmed

    structure = parmed.Structure()
    for i in range(cg.n_beads):
        atom = parmed.Atom(name=cg.bead_names[i], type=f"{cg.residue_names[i]}_{cg.bead_names[i]}", charge=0.0,
                           mass=float(cg.masses[i]), atomic_number=0)
        structure.add_atom(atom, cg.residue_names[i], int(cg.molecule_index[i]) + 1)
    for i, j in cg.bonds:
        structure.bonds.append(parmed.Bond(structure.atoms[int(i)], structure.atoms[int(j)]))
    structure.coordinates = np.asarray(cg.positions) * 10.0
    from openmm.app.internal.unitcell import computeLengthsAndAngles

    a, b, c, alpha, beta, gamma = computeLengthsAndAngles(np.asarray(cg.box))
    structure.box = [10 * a, 10 * b, 10 * c, np.degrees(alpha), np.degrees(beta), np.degrees(gamma)]
    names = ["cg.psf", "cg.gro", "cg.top"]
    for name in names:
        structure.save(str(folder / name), overwrite=True)
    return names


def readme_text(metadata: dict[str, Any]) -> str:
    model = metadata["model"]
    temperature_note = (
        f"The model takes the temperature as an input; it was scripted for **{model.get('temperature_K')} K**. "
        "Run it at that temperature, or export again with `--temperature`."
        if model.get("uses_temperature")
        else "The model does not depend on the temperature."
    )
    forces = "\n".join(f"- `{f['name']}` ({f['class']}, force group {f['force_group']})" for f in metadata["forces"])
    composition = ", ".join(f"{n} {name}" for name, n in metadata["composition"].items())
    return f"""# openmm_cgnn force-field export

A learned coarse-grained (CG) force field for {composition} ({metadata['n_beads']} beads), ready for
plain OpenMM. Nothing here needs the `openmm_cgnn` package.

| file | what |
|---|---|
| `system.xml` | the whole CG `System` (XmlSerializer): masses, box, and the forces below; the TorchForce embeds the graph-safe TorchScript model (no host reads, static shapes) with `useCUDAGraphs=true` |
| `cg.pdb` | one CG configuration with its box (CRYST1); "atoms" are beads, residues are molecules |
| `model.pt` | the same model as the host-reading TorchScript module (reuses its pair list; fastest on CPU) with its metadata (`torch.jit.load`; contract `forward(positions[N,3] nm, boxvectors[3,3] nm) -> energy kJ/mol`) |
| `mapping.json` | which atoms make each bead (openmm_cgnn mapping format) |
| `prior.json` | the physical prior (excluded volume, bonds, angles) |
| `metadata.json` | bead order, masses, cutoffs, temperature, versions, the round-trip check |
| `cg.psf`, `cg.gro`, `cg.top` | topology only (ParmEd), for VMD, MDAnalysis, GROMACS tools: bead types `RES_BEAD`, masses, bonds; they hold no potential |

Forces in `system.xml`:
{forces}

Prior carrier: `{metadata['prior_carrier']}` ("openmm": native forces beside the TorchForce; "model": inside the TorchScript module).
Bond constraints: {metadata['n_constraints']} (`--constrain-bonds {metadata['constrain_bonds']}`; they are in `system.xml`, and the
constrained bonds have no prior term; a plain-OpenMM integrator applies them itself).
{temperature_note}

## Python

`import torch` must come **before** `import openmm`: the openmm-torch plugins link against PyTorch's
libraries, and if OpenMM loads its plugins first the TorchForce has no kernels. `import openmmtorch`
makes sure the TorchForce class and its XML reader are registered.

```python
import torch  # first
import openmm
import openmm.app as app
import openmm.unit as unit
import openmmtorch  # noqa: F401

system = openmm.XmlSerializer.deserialize(open("system.xml").read())
pdb = app.PDBFile("cg.pdb")
integrator = openmm.LangevinMiddleIntegrator({model.get('temperature_K') or 300} * unit.kelvin, 1 / unit.picosecond, 0.005 * unit.picoseconds)
simulation = app.Simulation(pdb.topology, system, integrator)
simulation.context.setPositions(pdb.positions)
simulation.minimizeEnergy()
simulation.step(1000)
print(simulation.context.getState(getEnergy=True).getPotentialEnergy())
```

The time step above is an example; `openmm-cgnn simulate` picks the largest stable one by an
energy-conservation test and reports it in its `summary.json`. On a GPU, pass
`openmm.Platform.getPlatformByName("CUDA")` to `Simulation`: the TorchForce runs under CUDA
graphs; on the CPU and Reference platforms the same file runs as it is.

**Bad input gives NaN, never an exception.** NaN positions, a box under twice the cutoff
({max(float(model.get('cutoff_inter_nm') or 0), float(model.get('cutoff_intra_nm') or 0))} nm) or
more neighbour pairs than the model's pair list holds ({model.get('max_pairs_per_bead')} per bead)
make the energy and every force NaN, which OpenMM reports ("Energy is NaN", "Particle coordinate
is NaN"). To find out which, call the model on the last good positions:
`torch.jit.load("model.pt").diagnose(positions, box)` returns (flags, pair count): flag 1 pair-list
overflow, 2 box too small, 4 cell overflow, 8 NaN/inf input. A pair-list overflow is cured by
exporting again with a larger `max_pairs_per_bead` (`openmm-cgnn simulate` regrows it by itself).

## C++

The repository's top-level `CMakeLists.txt` builds `cgnn_run` against the pip-installed OpenMM,
openmm-torch and libtorch (headers and libraries ship in the wheels):

```sh
cmake -S path/to/openmm_cgnn -B build/cpp -DPython3_EXECUTABLE=$(which python)
cmake --build build/cpp
build/cpp/cgnn_run system.xml cg.pdb --steps 100 --dt-fs 2 --platform Reference
```

It loads OpenMM's plugins (set `OPENMM_PLUGIN_DIR` or `--plugins` if they moved), deserializes
`system.xml` (openmm-torch's serialization proxy lives in `libOpenMMTorch.so`, which the program
links), reads positions and box from `cg.pdb`, and prints the energies.

## Check

When this directory was written, `system.xml` + `cg.pdb` read back with plain OpenMM gave
{metadata['round_trip_check']['reloaded_potential_energy_kj_mol']:.6f} kJ/mol on the {metadata['round_trip_check']['platform']} platform, the same as the System they
were written from.
"""
