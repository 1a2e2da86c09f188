"""Liquids as data: which molecules, in what ratio, how many beads each, at which temperatures.

A liquid is a small JSON file (format ``openmm_cgnn.liquid/1``, described in docs/contracts.md
section 6). The package ships ``bmim_bf4``, ``emim_bf4`` and ``bmim_pf6`` next to this module;
``load_liquid`` takes one of those names or the path of a user's own file. Everything a stage
needs about a liquid comes from here: the converted force-field directory and residues for
``aa``, the formula-unit counts, the ``--beads`` option of ``map``, the default temperatures
and box sizes of the driver, and the experimental density the evaluation compares against.

Regenerate the converted force fields of the shipped liquids (after a converter change) with::

    python -m openmm_cgnn.liquids --clandp-dir DIR

where ``DIR`` holds ``il.ff`` and every z-matrix the liquid files name.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..layout import FORCEFIELD_XML

FORMAT = "openmm_cgnn.liquid/1"
LIQUIDS_DIR = Path(__file__).resolve().parent
SIZES = ("quick", "cpu", "full")


class LiquidError(ValueError):
    """A liquid file is missing or malformed, or a count does not fit it; one line naming the file and field."""


@dataclass(frozen=True)
class Molecule:
    residue: str  # residue name in the converted force field (and in frames and mapping.json)
    per_unit: int  # molecules of this type in one formula unit (the stoichiometry)
    beads: int  # CG beads per molecule of this type
    zmat: str | None  # CL&P z-matrix the force field was converted from (for regeneration)


@dataclass(frozen=True)
class Size:
    units: int  # formula units in the box
    temperatures_K: tuple[float, ...]
    # Of temperatures_K, those whose AA run is left out of mapping and training and used only to
    # evaluate the CG model at a temperature it never saw (the transfer claim).
    held_out_K: tuple[float, ...] = ()

    @property
    def training_temperatures_K(self) -> tuple[float, ...]:
        return tuple(t for t in self.temperatures_K if t not in self.held_out_K)


@dataclass
class Liquid:
    name: str
    title: str
    path: Path
    forcefield_dir: Path  # converted data (forcefield.xml + RES.pdb), see openmm_cgnn.aa.convert
    clandp_forcefield: str  # CL&P parameter file the z-matrices were converted with
    molecules: list[Molecule]
    sizes: dict[str, Size]
    experimental_density: dict[str, Any] | None = None
    notes: str = ""
    _formulae: dict[str, str] | None = field(default=None, repr=False)

    @property
    def residues(self) -> list[str]:
        return [m.residue for m in self.molecules]

    @property
    def stoichiometry(self) -> dict[str, int]:
        return {m.residue: m.per_unit for m in self.molecules}

    @property
    def one_to_one(self) -> bool:
        """Every molecule type once per formula unit: ``--pairs`` is then a shorthand for ``--units``."""
        return all(m.per_unit == 1 for m in self.molecules)

    def composition(self, units: int) -> dict[str, int]:
        """Molecule counts of ``units`` formula units."""
        return {m.residue: m.per_unit * int(units) for m in self.molecules}

    def beads_option(self) -> str:
        """The ``openmm-cgnn map --beads`` value, e.g. ``BMIM=4,BF4=1``."""
        return ",".join(f"{m.residue}={m.beads}" for m in self.molecules)

    def formulae(self) -> dict[str, str]:
        """Element formula (Hill order) of each residue, read from the converted force field."""
        if self._formulae is None:
            self._formulae = residue_formulae(self.forcefield_dir, self.residues, where=f"{self.path}: forcefield")
        return self._formulae

    def formula_units(self) -> dict[str, int]:
        """{formula: molecules per unit}: how the experimental density table recognises this liquid."""
        formulae = self.formulae()
        counts: dict[str, int] = {}
        for m in self.molecules:
            counts[formulae[m.residue]] = counts.get(formulae[m.residue], 0) + m.per_unit
        return counts


def available_liquids() -> list[str]:
    """Names of the liquids shipped with the package."""
    return sorted(p.stem for p in LIQUIDS_DIR.glob("*.json"))


def load_liquid(name_or_path: str | Path) -> Liquid:
    """A shipped liquid by name (``emim_bf4``) or a liquid file by path; errors name the file and field."""
    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix == ".json" or path.exists() or "/" in text):
        path = LIQUIDS_DIR / f"{text}.json"
        if not path.exists():
            raise LiquidError(f"--liquid {text!r}: no such liquid; shipped: {', '.join(available_liquids())} "
                              "(or give the path of a liquid file)")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LiquidError(f"{path}: no such liquid file") from None
    except (OSError, ValueError) as exc:
        raise LiquidError(f"{path}: not a readable JSON file ({exc})") from None
    return _parse(path, data)


def _parse(path: Path, data: Any) -> Liquid:
    def fail(where: str, message: str) -> LiquidError:
        return LiquidError(f"{path}: {where}: {message}")

    if not isinstance(data, dict):
        raise fail("top level", "must be a JSON object")
    if data.get("format") != FORMAT:
        raise fail("format", f"must be {FORMAT!r}, got {data.get('format')!r}")
    for key in ("name", "forcefield", "molecules", "sizes"):
        if key not in data:
            raise fail(key, "missing")
    known = {"format", "name", "title", "forcefield", "molecules", "sizes", "experimental_density", "notes"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise fail(unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
    name = data["name"]
    if not isinstance(name, str) or not name:
        raise fail("name", "must be a non-empty string")

    ff = data["forcefield"]
    if not isinstance(ff, dict) or not isinstance(ff.get("dir"), str):
        raise fail("forcefield.dir", "must be a directory (relative to the liquid file) holding forcefield.xml")
    forcefield_dir = (path.parent / ff["dir"]).resolve()
    if not (forcefield_dir / FORCEFIELD_XML).exists():
        raise fail("forcefield.dir", f"{forcefield_dir} has no forcefield.xml (see python -m openmm_cgnn.liquids)")

    raw = data["molecules"]
    if not isinstance(raw, list) or not raw:
        raise fail("molecules", "must be a non-empty list")
    molecules = []
    for i, entry in enumerate(raw):
        where = f"molecules[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("residue"), str) or not entry["residue"]:
            raise fail(f"{where}.residue", "missing (the residue name in the force field)")
        for key in ("per_unit", "beads"):
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(f"{where}.{key}", f"must be a positive integer, got {value!r}")
        zmat = entry.get("zmat")
        if zmat is not None and not isinstance(zmat, str):
            raise fail(f"{where}.zmat", f"must be a file name, got {zmat!r}")
        molecules.append(Molecule(entry["residue"], entry["per_unit"], entry["beads"], zmat))
    residues = [m.residue for m in molecules]
    if len(set(residues)) != len(residues):
        raise fail("molecules", f"a residue is listed twice: {residues}")
    if math.gcd(*(m.per_unit for m in molecules)) != 1:
        raise fail("molecules", "the per_unit counts share a factor; give the smallest formula unit")

    sizes = {}
    if not isinstance(data["sizes"], dict) or not data["sizes"]:
        raise fail("sizes", f"must map sizes ({', '.join(SIZES)}) to units and temperatures_K")
    for size, entry in data["sizes"].items():
        where = f"sizes.{size}"
        if not isinstance(entry, dict):
            raise fail(where, "must be an object with units and temperatures_K")
        units = entry.get("units")
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise fail(f"{where}.units", f"must be a positive integer, got {units!r}")
        temps = entry.get("temperatures_K")
        if (not isinstance(temps, list) or not temps or len(set(temps)) != len(temps)
                or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in temps)):
            raise fail(f"{where}.temperatures_K", f"must be distinct positive temperatures in K, got {temps!r}")
        held = entry.get("held_out_K", [])
        if (not isinstance(held, list) or len(set(held)) != len(held) or not set(held) <= set(temps)
                or len(held) >= len(temps)):
            raise fail(f"{where}.held_out_K", f"must list some of temperatures_K {temps} (not all: training needs one), "
                                              f"got {held!r}")
        sizes[size] = Size(units, tuple(float(t) for t in temps), tuple(float(t) for t in held))

    density = data.get("experimental_density")
    if density is not None:
        _check_density(density, lambda key, message: fail(f"experimental_density.{key}", message))
    return Liquid(name=name, title=str(data.get("title", name)), path=path, forcefield_dir=forcefield_dir,
                  clandp_forcefield=str(ff.get("clandp", "il.ff")), molecules=molecules, sizes=sizes,
                  experimental_density=density, notes=str(data.get("notes", "")))


def _check_density(entry: Any, fail) -> None:
    if not isinstance(entry, dict):
        raise fail("", "must be an object or null")
    if not isinstance(entry.get("source"), str) or not entry["source"]:
        raise fail("source", "missing: say where the numbers come from")
    temps, rho = entry.get("temperature_K"), entry.get("density_kg_m3")
    if not (isinstance(temps, list) and isinstance(rho, list) and temps and len(temps) == len(rho)):
        raise fail("density_kg_m3", "temperature_K and density_kg_m3 must be lists of the same length")
    if any(b <= a for a, b in zip(temps, temps[1:])):
        raise fail("temperature_K", "must increase")
    fit = entry.get("linear_fit")
    if not isinstance(fit, dict) or not {"intercept_kg_m3", "slope_kg_m3_K"} <= set(fit):
        raise fail("linear_fit", "needs intercept_kg_m3 and slope_kg_m3_K (used outside the measured range)")


def residue_formulae(forcefield_dir: Path, residues: Sequence[str], where: str = "") -> dict[str, str]:
    """Hill formula of each residue template in ``forcefield_dir/forcefield.xml`` (no OpenMM needed)."""
    from ..analysis.density import hill_formula

    xml_path = Path(forcefield_dir) / FORCEFIELD_XML
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise LiquidError(f"{where or xml_path}: cannot read {xml_path} ({exc})") from None
    elements = {t.attrib["name"]: t.attrib.get("element", "") for t in root.iterfind("AtomTypes/Type")}
    out = {}
    for residue in residues:
        template = root.find(f"Residues/Residue[@name='{residue}']")
        if template is None:
            raise LiquidError(f"{where or xml_path}: residue {residue!r} is not in {xml_path}")
        out[residue] = hill_formula([elements.get(a.attrib["type"], "") for a in template.iterfind("Atom")])
    return out


def composition_for(liquid: Liquid | None, residues: Sequence[str], *, pairs: int | None = None,
                    units: int | None = None, molecules: Mapping[str, int] | None = None) -> tuple[dict[str, int], str]:
    """Molecule counts from exactly one of ``pairs``, ``units`` or ``molecules``, and the option that gave them.

    ``residues`` (in order) are the molecule types when there is no liquid: one of each per unit.
    ``--pairs`` is the 1:1 shorthand and is refused for other stoichiometries.
    """
    given = [(flag, value) for flag, value in (("--pairs", pairs), ("--units", units), ("--molecules", molecules))
             if value is not None]
    if len(given) != 1:
        raise LiquidError("give exactly one of --pairs, --units or --molecules")
    flag, value = given[0]
    stoichiometry = liquid.stoichiometry if liquid is not None else {r: 1 for r in residues}
    if flag == "--molecules":
        return checked_counts(value, list(stoichiometry), "the molecule types are"), flag
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LiquidError(f"{flag} must be a positive integer, got {value!r}")
    if flag == "--pairs" and any(n != 1 for n in stoichiometry.values()):
        ratio = ":".join(str(n) for n in stoichiometry.values())
        raise LiquidError(f"--pairs is for 1:1 liquids; {liquid.name if liquid else 'this liquid'} is "
                          f"{ratio} ({', '.join(stoichiometry)}): use --units or --molecules")
    return {r: n * value for r, n in stoichiometry.items()}, flag


def checked_counts(counts: Mapping[str, int], known: Sequence[str], known_as: str) -> dict[str, int]:
    """``--molecules`` counts checked against the ``known`` residues, in their order."""
    unknown = sorted(set(counts) - set(known))
    if unknown or not counts:
        raise LiquidError(f"--molecules: {', '.join(unknown) or 'nothing'} given; {known_as} {', '.join(known)}")
    for residue, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LiquidError(f"--molecules {residue}={n}: counts must be positive integers")
    return {r: int(counts[r]) for r in known if r in counts}


def parse_counts(text: Sequence[str] | str, option: str = "--molecules") -> dict[str, int]:
    """``RES=N`` items (space or comma separated) as {residue: count}; errors name the option."""
    items = [p for chunk in ([text] if isinstance(text, str) else text) for p in chunk.split(",") if p]
    counts: dict[str, int] = {}
    for item in items:
        residue, sep, number = item.partition("=")
        if not sep or not residue or not number.strip().lstrip("-").isdigit():
            raise LiquidError(f"{option}: expected RES=N items, got {item!r}")
        if residue in counts:
            raise LiquidError(f"{option}: {residue} is given twice")
        counts[residue] = int(number)
    return counts
