"""Pictures of a learned mapping: loss curves per restart and the atoms x beads assignment.

Both read only the per-residue report of :func:`openmm_cgnn.mapping.learn.learn_mapping`, so they
can be redrawn from ``mapping_report.json`` without retraining.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..io import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on clusters or CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    return path


def plot_losses(residue: str, report: dict[str, Any], path: str | Path, rho: float) -> Path:
    """Training loss, reconstruction and force terms per epoch for every restart; the kept one bold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, run in enumerate(report["restarts"]):
        history = run["history"]
        if not history:  # a restart that diverged has nothing to draw
            continue
        epochs = np.arange(1, len(history["loss"]) + 1)
        chosen = run["seed"] == report["chosen_seed"] and run.get("valid", False)
        colour = colours[k % len(colours)]
        width = 2.2 if chosen else 1.0
        note = " (kept)" if chosen else ("" if run.get("valid", False) else " (no valid map)")
        ax.plot(epochs, history["loss"], color=colour, lw=width, label=f"seed {run['seed']}: loss{note}")
        ax.plot(epochs, history["rec"], color=colour, lw=width * 0.7, ls="--", label=f"seed {run['seed']}: L_rec")
        ax.plot(epochs, history["inst"], color=colour, lw=width * 0.7, ls=":", label=f"seed {run['seed']}: L_inst")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"loss = L_rec + {rho:g} L_inst (dimensionless)")
    if report["restarts"]:
        ax.set_yscale("log")
        tau_ax = ax.twinx()
        first = next((r["history"] for r in report["restarts"] if r["history"]), {"tau": []})
        tau_ax.plot(np.arange(1, len(first["tau"]) + 1), first["tau"], color="0.6", lw=0.8)
        tau_ax.set_ylabel("Gumbel-softmax temperature tau", color="0.5")
        ax.legend(fontsize=6, ncol=len(report["restarts"]), loc="upper right")
    else:
        ax.text(0.5, 0.5, "one bead: the map is fixed, nothing was trained", ha="center", va="center", transform=ax.transAxes)
    final = report["final"]
    ax.set_title(
        f"{residue}: {report['n_atoms']} atoms -> {report['n_beads']} beads; final map: loss {final['loss']:.4f} "
        f"(rec {final['rec']:.4f}, inst {final['inst']:.4f})",
        fontsize=9,
    )
    path = _save(fig, Path(path))
    plt.close(fig)
    return path


def plot_assignment(residue: str, report: dict[str, Any], path: str | Path) -> Path:
    """Learned soft assignment (colour) with the final discrete bead of each atom boxed."""
    plt = _pyplot()
    probabilities = np.asarray(report["probabilities"], dtype=float)
    atoms = report["atoms"]
    bead_names = list(report["beads"])
    bead_of = {atom: k for k, name in enumerate(bead_names) for atom in report["beads"][name]}
    n_atoms, n_beads = probabilities.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * n_beads, 1.2 + 0.25 * n_atoms))
    image = ax.imshow(probabilities, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    for i, atom in enumerate(atoms):
        k = bead_of[atom]
        ax.add_patch(plt.Rectangle((k - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set_xticks(range(n_beads), bead_names)
    ax.set_yticks(range(n_atoms), atoms, fontsize=7)
    ax.set_xlabel("bead")
    ax.set_ylabel("atom")
    ax.set_title(f"{residue}: softmax(logits); red = final map", fontsize=9)
    fig.colorbar(image, ax=ax, label="assignment probability")
    path = _save(fig, Path(path))
    plt.close(fig)
    return path
