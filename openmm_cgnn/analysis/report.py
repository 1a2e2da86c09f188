"""``report.md``: the metrics of an evaluation as readable tables, with the plots linked."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..io import write_text_atomic


def format_pm(value: float | None, error: float | None, digits: int = 2) -> str:
    """'(1.23 ± 0.05)e-11' style: value and error on one shared power of ten."""
    if value is None:
        return "—"
    exponent = int(math.floor(math.log10(abs(value)))) if value != 0 else 0
    scale = 10.0 ** exponent
    body = f"{value / scale:.{digits}f}"
    if error is not None:
        body = f"{body} ± {error / scale:.{digits}f}"
        if exponent:
            body = f"({body})"
    return body + (f"e{exponent}" if exponent else "")


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "—" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _ratio_cell(ratio: dict | None) -> str:
    if not ratio or ratio.get("ratio") is None:
        return "—"
    return f"{ratio['ratio']:.2f} ± {ratio['error']:.2f}"


def _ea_cell(fit: dict | None) -> str:
    if fit is None:
        return "—"
    if fit["status"] != "ok":
        return fit["status"]
    return f"{fit['Ea_kJ_mol']:.2f} ± {fit['Ea_err_kJ_mol']:.2f}"


class _Notes:
    """Numbered notes under a table, so long reasons do not stretch its cells."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.printed = 0

    def mark(self, text: str) -> str:
        if text not in self.items:
            self.items.append(text)
        return f"[{self.items.index(text) + 1}]"

    def lines(self) -> list[str]:
        """The notes not yet printed (under an earlier table that shares the numbering)."""
        new = [f"[{i}] {text}  " for i, text in enumerate(self.items, 1)][self.printed:]
        self.printed = len(self.items)
        return new + ([""] if new else [])


def _t(metrics: dict[str, Any], key: str, unit: str = "") -> str:
    """A temperature key (and its unit), marked when its AA run was held out of training."""
    return f"{key}{unit}" + (" (held out)" if key in metrics.get("held_out_temperatures_K", []) else "")


def _ea_difference(entry: dict) -> str:
    if entry.get("Ea_relative_difference") is None:
        return ""
    return f" ({100 * entry['Ea_relative_difference']:+.0f} ± {100 * entry['Ea_relative_difference_err']:.0f}%)"


_VERDICT_WORDS = {"met": "**met**", "missed": "**missed**", "not measured": "not measured",
                  "not resolved": "not resolved"}


def _summary(metrics: dict[str, Any]) -> list[str]:
    """The verdict in one table: activation energies against their target, CG speed-up, worst RDF errors."""
    verdict = metrics.get("verdict", {})
    targets = verdict.get("targets", {})
    notes = _Notes()
    rows = []
    for species, entry in metrics["arrhenius"].items():
        judged = verdict.get("Ea", {}).get(species, {})
        fitted = [f"{k.upper()} {_ea_cell(entry[k])}" for k in ("aa", "cg") if entry.get(k, {}).get("status") == "ok"]
        value = (", ".join(fitted) + " kJ/mol" if fitted else "—") + _ea_difference(entry)
        without = entry.get("without_held_out")
        if without is not None:  # the verdict is on the fit over every temperature; this one is beside it
            kept = [f"{k.upper()} {_ea_cell(without[k])}" for k in ("aa", "cg") if without.get(k, {}).get("status") == "ok"]
            value += (f"; without the held-out {', '.join(metrics['held_out_temperatures_K'])} K: "
                      + (", ".join(kept) + " kJ/mol" if kept else "no fit") + _ea_difference(without))
        status = _VERDICT_WORDS.get(judged.get("status", ""), "—")
        if judged.get("detail"):
            status += " " + notes.mark(judged["detail"])
        elif judged.get("status") == "not resolved":
            status += " " + notes.mark("the uncertainty of the E_a difference is wider than the target: "
                                       "more temperatures with a converged D, or longer runs, are needed")
        target = f"within {_pct(targets['Ea_relative'])}" if "Ea_relative" in targets else "—"
        rows.append([f"E_a of {species}", value, target, status])
    for species, by_t in metrics["d_ratio_cg_aa"].items():
        cells = [f"{_t(metrics, key, ' K')}: {_ratio_cell(r)}" for key, r in by_t.items()]
        rows.append([f"D_CG / D_AA of {species}", "; ".join(cells), "—", "—"])
    for group, label in (("com", "molecular centres"), ("bead", "bead types")):
        judged = verdict.get("rdf", {}).get(group)
        if not judged:
            continue
        value = (f"{_pct(judged['worst_error'])} ({judged['pair']} at {_t(metrics, judged['temperature'], ' K')}; "
                 f"noise floor {_pct(judged['noise_floor'])})")
        status = _VERDICT_WORDS[judged["status"]]
        if judged["status"] == "not resolved":
            status += " " + notes.mark(f"the error is within a few counting-noise floors ({_pct(judged['noise_floor'])}):"
                                       " sample more frames or a larger box to decide")
        rows.append([f"worst RDF error, {label}", value, f"under {_pct(targets.get('rdf_error'))}", status])
    for name, judged in verdict.get("bonded", {}).items():
        rows.append([f"{judged['kind']} {name}: total-variation difference", f"{_pct(judged['worst_tv'])} "
                     f"(at {judged['temperature']} K; noise floor {_pct(judged['noise_floor'])})",
                     f"under {_pct(targets.get('bonded_tv'))}", _VERDICT_WORDS[judged["status"]]])
    return ["## Summary", ""] + _table(["quantity", "value", "target", "verdict"], rows) + notes.lines()


def _diffusion_cell(result: dict | None, notes: _Notes, where: str) -> str:
    if result is None:
        return "—"
    if result["status"] != "ok":
        return "not converged " + notes.mark(f"{where}: {result['reason']}")
    return format_pm(result["D_m2_s"], result["D_err_m2_s"])


def _runs(metrics: dict[str, Any]) -> list[str]:
    held = metrics.get("held_out_temperatures_K", [])
    rows = [[r["kind"].upper() + (" (prior only)" if prior else ""),
             f"{r['temperature_K']:g}" + (" (held out)" if any(abs(float(k) - r["temperature_K"]) < 0.5 for k in held)
                                          else ""),
             str(r["n_frames"]), f"{r['time_ps'][0]:g}–{r['time_ps'][1]:g}",
             ", ".join(f"{n} {s}" for s, n in r["n_molecules"].items()), f"{r['box_nm']:.3f}", f"`{r['path']}`"]
            for prior, group in ((False, metrics["runs"]), (True, metrics.get("prior_only_runs", [])))
            for r in group]
    out = ["## Runs", ""] + _table(["kind", "T (K)", "frames", "time (ps)", "molecules", "box (nm)", "path"], rows)
    models = {(r["forcefield"], r["refined"]) for r in [*metrics["runs"], *metrics.get("prior_only_runs", [])]
              if r.get("forcefield")}
    for path, refined in sorted(models):
        out += [f"CG force field: `{path}`" + (" (bonded tables refined against the AA distributions by "
                                               "`openmm-cgnn refine`, see its refine.json)" if refined else ""), ""]
    if held:
        out += [f"Held out: the AA runs at {', '.join(held)} K were not used in training; the CG model is "
                "evaluated there as at the training temperatures.", ""]
    return out


def _ablation(metrics: dict[str, Any]) -> list[str]:
    """The trained model beside the prior-only model (the network switched off): what the network adds."""
    ablation = metrics.get("ablation")
    if not ablation:
        return []
    out = ["## Ablation: trained model against the prior alone", "",
           "The prior-only model is the same CG model with the network switched off (the same priors, time step "
           "and run length). Both are compared with the same AA runs; the verdict above is the trained model's.", ""]
    species = sorted({s for model in ablation.values() for row in model["by_temperature"].values()
                      for s in row.get("d_ratio_cg_aa", {})})
    rows = []
    for label, name in (("trained", "trained"), ("prior only", "prior_only")):
        for key, row in ablation[name]["by_temperature"].items():
            cells = [label, _t(metrics, key)]
            for group in ("com", "bead"):
                worst = row.get(f"worst_{group}_rdf_error")
                cells.append(f"{_pct(worst['error'])} ({worst['pair']})" if worst else "—")
            tv = row.get("bonded_tv", {})
            worst_tv = max(tv, key=tv.get) if tv else None
            cells.append(f"{_pct(tv[worst_tv])} ({worst_tv})" if worst_tv else "—")
            cells += [_ratio_cell(row.get("d_ratio_cg_aa", {}).get(s)) for s in species]
            rows.append(cells)
    out += _table(["model", "T (K)", "worst RDF error, centres", "worst RDF error, beads", "worst bonded TV"]
                  + [f"D_CG / D_AA {s}" for s in species], rows)
    rows = [[label, s, _ea_cell({"status": "ok", **e}) if e["Ea_kJ_mol"] is not None else "—",
             _pct(e["relative_difference"])]
            for label, name in (("trained", "trained"), ("prior only", "prior_only"))
            for s, e in ablation[name]["Ea"].items()]
    out += _table(["model", "species", "E_a CG (kJ/mol)", "CG vs AA"], rows)
    terms = sorted({t for model in ablation.values() for row in model["by_temperature"].values()
                    for t in row.get("bonded_tv", {})})
    rows = [[term, _t(metrics, key), _pct(row.get("bonded_tv", {}).get(term)),
             _pct(ablation["prior_only"]["by_temperature"].get(key, {}).get("bonded_tv", {}).get(term))]
            for term in terms for key, row in ablation["trained"]["by_temperature"].items()]
    if rows:
        out += ["<details><summary>Bond and angle total-variation differences, trained against prior only</summary>",
                ""] + _table(["term", "T (K)", "trained", "prior only"], rows) + ["</details>", ""]
    return out


def _dynamics(metrics: dict[str, Any], plots: set[str]) -> list[str]:
    out = ["## Dynamics", "",
           "D from a linear fit of the centre-of-mass MSD (system drift removed) over the diffusive window, "
           f"found where the log-log slope is 1 ± {metrics['settings']['slope_tolerance']}; errors are standard "
           "errors over groups of molecules. D is for the stated periodic box (no finite-size correction) "
           "unless a Yeh–Hummer column is shown.", ""]
    with_yh = any(r.get("D_yeh_hummer_m2_s") is not None for by_t in metrics["diffusion"].values()
                  for e in by_t.values() for r in e.values())
    rows = []
    notes = _Notes()
    for species, by_t in metrics["diffusion"].items():
        for key, entry in by_t.items():
            row = [species, _t(metrics, key), _diffusion_cell(entry.get("aa"), notes, f"AA {species} {key} K"),
                   _diffusion_cell(entry.get("cg"), notes, f"CG {species} {key} K"),
                   _ratio_cell(metrics["d_ratio_cg_aa"].get(species, {}).get(key)),
                   " / ".join(f"{entry[k]['box_nm']:.2f}" if k in entry else "—" for k in ("aa", "cg"))]
            if with_yh:
                row.append(" / ".join(format_pm(entry[k].get("D_yeh_hummer_m2_s"), None) if k in entry else "—"
                                      for k in ("aa", "cg")))
            rows.append(row)
    header = ["species", "T (K)", "D AA (m²/s)", "D CG (m²/s)", "D_CG / D_AA", "box AA / CG (nm)"]
    out += _table(header + (["D Yeh–Hummer AA / CG"] if with_yh else []), rows) + notes.lines()

    rows = []
    for species, entry in metrics["arrhenius"].items():
        cells = []
        for kind in ("aa", "cg"):
            fit = entry.get(kind)
            ea = _ea_cell(fit)
            if fit is not None and fit["status"] != "ok":
                ea += " " + notes.mark(f"{kind.upper()} {species}: {fit['reason']}")
            cells += [ea, format_pm(fit["D0_m2_s"], None) if fit and fit["status"] == "ok" else "—"]
        rows.append([species, cells[0], cells[2], _pct(entry.get("Ea_relative_difference")), cells[1], cells[3]])
    if rows:
        out += ["### Arrhenius fits ln D = ln D0 − E_a / RT", ""]
        out += _table(["species", "E_a AA (kJ/mol)", "E_a CG (kJ/mol)", "CG vs AA", "D0 AA (m²/s)",
                       "D0 CG (m²/s)"], rows)
        out += notes.lines()
    out += [f"![MSD {name[4:-4]}]({name})" for name in sorted(plots) if name.startswith("msd_")]
    if "arrhenius.png" in plots:
        out += ["", "![Arrhenius plot](arrhenius.png)"]
    return out + [""]


def _spread(m: dict, unit: str, kind: str, fmt: str) -> str:
    return f"{format(m['mean_' + unit][kind], fmt)} ± {format(m['std_' + unit][kind], fmt)} {unit}"


def _structure(metrics: dict[str, Any], plots: set[str]) -> list[str]:
    out = ["## Structure", ""]
    if not metrics["rdf"]:
        return out + ["No temperature has both an AA and a CG run: structure not compared.", ""]
    out += ["RDF error: ∫|g_CG − g_AA| dr / ∫ g_AA dr; first peak of the smoothed curve. "
            "Bead-type RDFs count only pairs in different molecules. The noise floor is the error that "
            "counting noise alone would give (a lower bound; frames are correlated).", ""]
    header = ["pair", "T (K)", "error", "noise floor", "first peak r AA / CG (nm)", "peak g AA / CG"]
    for group in ("com", "bead"):
        rows = []
        for entry in metrics["rdf"].values():
            if entry["kind"] != group:
                continue
            for key, m in entry["by_temperature"].items():
                rows.append(["–".join(entry["pair"]), _t(metrics, key), _pct(m["error"]), _pct(m["noise_floor"]),
                             f"{_num(m['peak_r_nm']['aa'])} / {_num(m['peak_r_nm']['cg'])}",
                             f"{_num(m['peak_g']['aa'], '.2f')} / {_num(m['peak_g']['cg'], '.2f')}"])
        if not rows:
            continue
        if group == "com":
            out += ["### Molecular centres of mass", ""] + _table(header, rows)
        else:  # many pairs: folded so the molecular table and the bond checks stay in view
            out += ["<details><summary>Bead-type RDFs (intermolecular pairs)</summary>", ""]
            out += _table(header, rows) + ["</details>", ""]
    rows = []
    for key, bonded in metrics["structure"].items():
        for group, unit, fmt in (("bonds", "nm", ".3f"), ("angles", "deg", ".1f")):
            for name, m in bonded[group].items():
                rows.append([name, _t(metrics, key), _spread(m, unit, "aa", fmt), _spread(m, unit, "cg", fmt), _pct(m["error"]),
                             _pct(m.get("noise_floor"))])
    if rows:
        out += ["Bond and angle distributions (mean ± standard deviation; difference = total-variation "
                "distance; noise floor = that distance between the two time halves of the AA sample):", ""]
        out += _table(["term", "T (K)", "AA (mapped)", "CG", "difference", "noise floor"], rows)
    for prefix in ("rdf_com_", "rdf_bead_", "bonds_", "angles_"):
        out += [f"![{name[:-4]}]({name})" for name in sorted(plots) if name.startswith(prefix)]
    return out + [""]


def _density(metrics: dict[str, Any], plots: set[str]) -> list[str]:
    density = metrics["density"]
    out = ["## Density of the AA runs", ""]
    if density.get("reference"):
        ref = density["reference"]
        out += [f"Experiment: {ref['name']}, {ref['source']}; measured {ref['measured_range_K'][0]:g}–"
                f"{ref['measured_range_K'][1]:g} K, linear fit beyond (marked *).", ""]
    else:
        out += [density.get("note", "No experimental reference."), ""]
    rows = []
    for key, d in density["runs"].items():
        if d.get("err_from") == "NPT":
            err = f"{d['err_kg_m3']:.1f} (of the NPT mean that fixed the box)"
        else:
            err = "box fixed (NVT)" if d["box_fixed"] else _num(d["err_kg_m3"], ".1f")
        exp = "—"
        if "experiment_kg_m3" in d:
            exp = f"{d['experiment_kg_m3']:.1f}" + ("*" if d["experiment_extrapolated"] else "")
        rows.append([key, f"{d['density_kg_m3']:.1f}", err, exp, _pct(d.get("relative_difference"))])
    out += _table(["T (K)", "AA (kg/m³)", "± (kg/m³)", "experiment (kg/m³)", "difference"], rows)
    if "density.png" in plots:
        out += ["![density](density.png)", ""]
    return out


def render_report(metrics: dict[str, Any]) -> str:
    plots = set(metrics.get("plots", []))
    out = ["# Evaluation: CG against mapped all-atom runs", ""]
    out += [f"Mapping `{metrics['mapping']['sha256'][:12]}` with bead types "
            + ", ".join(f"`{t}`" for t in metrics["mapping"]["bead_types"]) + ".", ""]
    out += _summary(metrics) + _ablation(metrics) + _runs(metrics) + _dynamics(metrics, plots) + _structure(metrics, plots)
    out += _density(metrics, plots)
    return "\n".join(out) + "\n"


def write_report(path: Path, metrics: dict[str, Any]) -> Path:
    return write_text_atomic(path, render_report(metrics))
