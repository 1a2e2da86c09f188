"""The coarse-graining auto-encoder (CGAE) of one residue type, after Wang & Gómez-Bombarelli (2019).

Encoder: learnable logits (atom groups x beads) sampled with Gumbel-softmax at an annealed
temperature ``tau(epoch) = tau0 * exp(-epoch / (r * E)) + tau_min``; bead positions are the
mass-weighted averages of the atoms under the soft assignment. Decoder: a learnable linear map that
rebuilds every atom from the bead positions. Loss: ``L = L_rec + rho * L_inst``.

Both terms are dimensionless so that ``rho`` means the same for any molecule:

- ``L_rec`` = mean squared reconstruction error / mean squared atom distance from the molecule's
  centre of mass. 1 is "decoding every atom to the centre", 0 is perfect.
- ``L_inst`` = mean over beads of |summed bead force|^2 / ((n_atoms / n_beads) * mean |atomic force|^2).
  The denominator is what the summed force of a bead of average size would be if atomic forces were
  uncorrelated, so 1 is "no cancellation" and small values mean the bead's internal (bond) forces
  cancel: the mapping keeps stiff, strongly interacting atoms together. Dividing by the
  mean squared atomic force also removes the kJ/mol/nm scale (atomic forces are 10^2 - 10^3).

Default ``rho = 1`` (:data:`DEFAULT_RHO`): equal weight to "beads summarise the geometry" and
"beads hold stiff internal forces". On [BMIM][BF4] (CL&P, 400 K) rho = 0 cuts the imidazolium ring
in two, rho = 1 keeps the ring whole (ring | methyl | butyl CH2CH2CH2 | terminal CH3), and rho >= 3
lets the force term empty beads during training (the discrete map then needs repairs).

Atoms may share logits (``atom_group``): by default a hydrogen is tied to its bonded heavy atom so
the trained assignment already obeys the rule the discrete map enforces.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

DEFAULT_RHO = 1.0
DEFAULT_EPOCHS = 150
DEFAULT_BATCH_SIZE = 256


@dataclass
class CGAEConfig:
    n_beads: int
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    min_steps_per_epoch: int = 8
    rho: float = DEFAULT_RHO
    lr_logits: float = 0.02
    lr_decoder: float = 0.05
    tau0: float = 2.0
    tau_min: float = 0.05
    anneal_fraction: float = 0.2  # r: tau reaches tau_min + tau0*e^-5 at the last epoch
    seed: int = 0
    device: str = "cpu"

    def tau(self, epoch: int) -> float:
        return self.tau0 * math.exp(-epoch / (self.anneal_fraction * max(self.epochs, 1))) + self.tau_min


@dataclass
class LossScales:
    """Normalisers that make both loss terms dimensionless (see the module docstring)."""

    position_sq: float  # nm^2
    force_sq: float  # (kJ/mol/nm)^2, already times n_atoms / n_beads

    @classmethod
    def from_samples(cls, positions: np.ndarray, forces: np.ndarray, n_beads: int) -> "LossScales":
        n_atoms = positions.shape[1]
        position_sq = float(np.mean(np.sum(np.asarray(positions, dtype=np.float64) ** 2, axis=-1)))
        force_sq = float(np.mean(np.sum(np.asarray(forces, dtype=np.float64) ** 2, axis=-1)))
        # A rigid or single-atom set of samples has no spread; keep the loss finite.
        return cls(position_sq=max(position_sq, 1e-12), force_sq=max(force_sq * n_atoms / n_beads, 1e-12))


@dataclass
class TrainResult:
    config: CGAEConfig
    probabilities: np.ndarray  # (n_atoms, n_beads) softmax of the learned logits
    decoder: np.ndarray  # (n_atoms, n_beads)
    history: dict[str, list[float]]  # per epoch: tau, loss, rec, inst
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        last = {k: v[-1] for k, v in self.history.items() if v}
        return {"seed": self.config.seed, "final_epoch": last, "seconds": round(self.seconds, 3), **self.extra}


class CGAE(torch.nn.Module):
    """Gumbel-softmax encoder + linear decoder for samples of one molecule type."""

    def __init__(self, masses: np.ndarray, atom_group: np.ndarray, n_beads: int, generator: torch.Generator) -> None:
        super().__init__()
        n_atoms = len(masses)
        n_groups = int(np.max(atom_group)) + 1
        self.register_buffer("masses", torch.as_tensor(np.asarray(masses), dtype=torch.float32))
        self.register_buffer("atom_group", torch.as_tensor(np.asarray(atom_group), dtype=torch.long))
        # Small logits: the early, hot Gumbel samples explore all assignments.
        self.logits = torch.nn.Parameter(0.01 * torch.randn(n_groups, n_beads, generator=generator))
        self.decoder = torch.nn.Parameter(torch.randn(n_atoms, n_beads, generator=generator) / n_beads + 1.0 / n_beads)

    def soft_assignment(self, tau: float, gumbel: torch.Tensor | None) -> torch.Tensor:
        """(B, n_atoms, n_beads) rows summing to 1; noiseless softmax of logits/tau when ``gumbel`` is None."""
        logits = self.logits if gumbel is None else self.logits + gumbel
        return torch.softmax(logits / tau, dim=-1)[..., self.atom_group, :]

    def losses(
        self, positions: torch.Tensor, forces: torch.Tensor, assignment: torch.Tensor, scales: LossScales
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if assignment.dim() == 2:
            assignment = assignment.expand(positions.shape[0], -1, -1)
        weights = assignment * self.masses[:, None]
        weights = weights / (weights.sum(dim=-2, keepdim=True) + 1e-8)  # per-bead COM weights
        beads = torch.einsum("snb,snd->sbd", weights, positions)
        rebuilt = torch.einsum("nb,sbd->snd", self.decoder, beads)
        rec = ((rebuilt - positions) ** 2).sum(-1).mean() / scales.position_sq
        bead_forces = torch.einsum("snb,snd->sbd", assignment, forces)
        inst = (bead_forces**2).sum(-1).mean() / scales.force_sq
        return rec, inst


def _gumbel(shape: tuple[int, ...], generator: torch.Generator, device: str) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def train_cgae(
    positions: np.ndarray,
    forces: np.ndarray,
    masses: np.ndarray,
    config: CGAEConfig,
    atom_group: np.ndarray | None = None,
    on_epoch: Callable[[], None] | None = None,
) -> TrainResult:
    """Train one CGAE on centred samples ``positions``/``forces`` (S, n_atoms, 3); deterministic under ``config.seed``.

    ``on_epoch`` is called after every epoch (progress reporting).
    """
    # The tensors are tiny (batch x atoms x beads): intra-op threads only add overhead, and on a
    # busy machine spinning OpenMP threads made training over 10x slower. One thread, restored after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(positions, forces, masses, config, atom_group, on_epoch)
    finally:
        torch.set_num_threads(threads)


def _train(
    positions: np.ndarray, forces: np.ndarray, masses: np.ndarray, config: CGAEConfig, atom_group: np.ndarray | None,
    on_epoch: Callable[[], None] | None = None,
) -> TrainResult:
    started = time.perf_counter()
    n_samples, n_atoms, _ = positions.shape
    if atom_group is None:
        atom_group = np.arange(n_atoms)
    device = config.device
    scales = LossScales.from_samples(positions, forces, config.n_beads)
    init_gen = torch.Generator().manual_seed(int(config.seed))
    model = CGAE(masses, atom_group, config.n_beads, init_gen).to(device)
    noise_gen = torch.Generator(device=device).manual_seed(int(config.seed) + 1)
    shuffle_gen = torch.Generator().manual_seed(int(config.seed) + 2)
    x_all = torch.as_tensor(np.asarray(positions), dtype=torch.float32, device=device)
    f_all = torch.as_tensor(np.asarray(forces), dtype=torch.float32, device=device)
    optimizer = torch.optim.Adam(
        [{"params": [model.logits], "lr": config.lr_logits}, {"params": [model.decoder], "lr": config.lr_decoder}]
    )
    n_groups = model.logits.shape[0]
    history: dict[str, list[float]] = {"tau": [], "loss": [], "rec": [], "inst": []}
    for epoch in range(config.epochs):
        tau = config.tau(epoch)
        # Small data sets still get min_steps_per_epoch steps: the assignment needs enough
        # optimiser steps per temperature, and samples are cheap to revisit.
        batch_size = min(config.batch_size, n_samples)
        n_steps = max(math.ceil(n_samples / batch_size), config.min_steps_per_epoch)
        passes = math.ceil(n_steps * batch_size / n_samples)
        order = torch.cat([torch.randperm(n_samples, generator=shuffle_gen) for _ in range(passes)]).to(device)
        sums = np.zeros(3)
        for step in range(n_steps):
            batch = order[step * batch_size : (step + 1) * batch_size]
            x, f = x_all[batch], f_all[batch]
            # One Gumbel draw per sample: the gradient averages over many assignments per step.
            gumbel = _gumbel((len(batch), n_groups, config.n_beads), noise_gen, device)
            rec, inst = model.losses(x, f, model.soft_assignment(tau, gumbel), scales)
            loss = rec + config.rho * inst
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += len(batch) * np.array([loss.item(), rec.item(), inst.item()])
        sums /= n_steps * batch_size
        if not np.isfinite(sums).all():
            raise FloatingPointError(f"CGAE training diverged at epoch {epoch} (seed {config.seed}): loss {sums[0]}")
        history["tau"].append(tau)
        history["loss"].append(float(sums[0]))
        history["rec"].append(float(sums[1]))
        history["inst"].append(float(sums[2]))
        if on_epoch is not None:
            on_epoch()
    with torch.no_grad():
        probabilities = torch.softmax(model.logits, dim=-1)[model.atom_group].cpu().numpy().astype(np.float64)
        decoder = model.decoder.detach().cpu().numpy().astype(np.float64)
    return TrainResult(
        config=config,
        probabilities=probabilities,
        decoder=decoder,
        history=history,
        seconds=time.perf_counter() - started,
        extra={"scales": asdict(scales)},
    )


def evaluate_assignment(
    positions: np.ndarray, forces: np.ndarray, masses: np.ndarray, assignment: np.ndarray, rho: float
) -> dict[str, float]:
    """Losses of a *discrete* map, with the best linear decoder for it (least squares).

    Fitting the decoder in closed form scores the map itself, not how far one run's decoder got,
    so restarts and repaired maps compare fairly.
    """
    positions = np.asarray(positions, dtype=np.float64)
    forces = np.asarray(forces, dtype=np.float64)
    n_beads = int(assignment.max()) + 1
    scales = LossScales.from_samples(positions, forces, n_beads)
    member = np.zeros((len(masses), n_beads))
    member[np.arange(len(masses)), assignment] = 1.0
    weights = member * np.asarray(masses, dtype=np.float64)[:, None]
    weights /= weights.sum(axis=0, keepdims=True)
    beads = np.einsum("nb,snd->sbd", weights, positions)
    design = beads.transpose(0, 2, 1).reshape(-1, n_beads)  # (S*3, beads): x, y, z share the decoder
    target = positions.transpose(0, 2, 1).reshape(-1, positions.shape[1])
    # Centred samples make the mass-weighted bead positions sum to zero: the design is rank-deficient
    # up to float32 noise, which a default cutoff would fit. Cut well above that noise.
    decoder, *_ = np.linalg.lstsq(design, target, rcond=1e-5)
    rec = float(np.mean(((design @ decoder - target) ** 2).reshape(len(positions), 3, -1).sum(axis=1)) / scales.position_sq)
    bead_forces = np.einsum("nb,snd->sbd", member, forces)
    inst = float(np.mean(np.sum(bead_forces**2, axis=-1)) / scales.force_sq)
    return {"loss": rec + rho * inst, "rec": rec, "inst": inst}
