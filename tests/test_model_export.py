"""TorchScript export (TorchForce contract, metadata, OpenMM) and model-directory checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openmm_cgnn.model import (
    HybridGraphConfig,
    export_for_frames,
    load_model,
    read_checkpoint,
    read_metadata,
    save_checkpoint,
    save_scripted,
    script_for_system,
)
from openmm_cgnn.testing.cg_models import ionic_liquid, synthetic_model, tensors

CONTRACT_METADATA_KEYS = {
    "units", "cutoff_intra_nm", "cutoff_inter_nm", "bead_type_names", "bead_type", "bead_names", "masses", "n_beads",
    "mapping_sha256", "uses_temperature", "temperature_K", "includes_prior", "package_version", "periodic",
}


@pytest.fixture(scope="module")
def liquid():
    return ionic_liquid(n_pairs=8, box_nm=1.9, frames=2, seed=11)


@pytest.fixture(scope="module")
def model(liquid):
    return synthetic_model(liquid, seed=0, weight_scale=2.0, max_pairs_per_bead=32.0)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float64])
def test_scripted_equals_eager(liquid, model, input_dtype):
    positions, box, bead_type, molecules = tensors(liquid, dtype=input_dtype)
    energy, forces = model.energy_and_forces(positions[:1], box[:1], bead_type, molecules)
    scripted = script_for_system(model, bead_type, molecules)
    position = positions[0].clone().requires_grad_(True)
    value = scripted(position, box[0])
    value.backward()
    assert value.dtype == torch.float64 and value.dim() == 0
    assert position.grad.dtype == input_dtype
    assert float(value.detach()) == pytest.approx(float(energy[0]), rel=1e-5)
    torch.testing.assert_close(-position.grad, forces[0], rtol=1e-5, atol=1e-5 * float(forces.abs().max()))
    network_only = script_for_system(model, bead_type, molecules, include_prior=False)
    expected = model(positions[:1], box[:1], bead_type, molecules, terms="network")
    assert float(network_only(positions[0], box[0])) == pytest.approx(float(expected[0].detach()), rel=1e-5)


def test_cell_export_equals_dense_export(liquid, model):
    cg = ionic_liquid(n_pairs=40, box_nm=2.9, frames=1, seed=12, jitter_nm=0.04)
    positions, box, bead_type, molecules = tensors(cg, dtype=torch.float64)
    dense = script_for_system(model, bead_type, molecules, neighbor_backend="dense", max_pairs_per_bead=48.0)
    cell = script_for_system(model, bead_type, molecules, neighbor_backend="cell", box=box[0], max_pairs_per_bead=48.0)
    assert cell.neighbor_backend == "cell" and dense.neighbor_backend == "dense"
    assert float(cell(positions[0], box[0])) == pytest.approx(float(dense(positions[0], box[0])), rel=1e-6)
    with pytest.raises(ValueError, match="needs the box"):
        script_for_system(model, bead_type, molecules, neighbor_backend="cell")


def test_saved_model_runs_in_openmm_torchforce(liquid, model, tmp_path):
    import openmm
    from openmmtorch import TorchForce

    path = export_for_frames(model, liquid, tmp_path / "model.pt", mapping_sha256="0" * 64)
    metadata = read_metadata(path)
    assert CONTRACT_METADATA_KEYS <= set(metadata)
    assert metadata["n_beads"] == len(liquid.bead_type) and metadata["includes_prior"] is True
    assert metadata["bead_type_names"] == liquid.bead_type_names and metadata["cutoff_inter_nm"] == 0.8
    assert metadata["bead_names"] == list(liquid.bead_name) and metadata["mapping_sha256"] == "0" * 64
    positions, box, bead_type, molecules = tensors(liquid, dtype=torch.float64)
    energy, forces = model.energy_and_forces(positions[:1], box[:1], bead_type, molecules)

    system = openmm.System()
    for mass in liquid.masses:
        system.addParticle(float(mass))
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in liquid.box[0].astype(float)])
    force = TorchForce(str(path))
    force.setUsesPeriodicBoundaryConditions(True)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    # Beads wrapped one by one into the box, as OpenMM may do: same energy.
    images = np.floor(liquid.positions[0] / 1.9)
    context.setPositions((liquid.positions[0] - images * 1.9).astype(float))
    state = context.getState(getEnergy=True, getForces=True)
    assert state.getPotentialEnergy()._value == pytest.approx(float(energy[0]), rel=1e-5)
    openmm_forces = np.asarray(state.getForces(asNumpy=True)._value)
    np.testing.assert_allclose(openmm_forces, forces[0].numpy(), rtol=1e-4, atol=1e-4 * float(forces.abs().max()))


def test_save_scripted_is_atomic_and_metadata_readable(liquid, model, tmp_path):
    _, _, bead_type, molecules = tensors(liquid)
    scripted = script_for_system(model, bead_type, molecules)
    path = save_scripted(scripted, tmp_path / "model.pt", {"n_beads": len(bead_type)})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_scripted(scripted, path, {"bad": object()})  # not JSON: refused before writing
    assert path.read_bytes() == before
    assert read_metadata(path) == {"n_beads": len(bead_type)}
    loaded = torch.jit.load(str(path))
    positions, box, _, _ = tensors(liquid)
    assert float(loaded(positions[0], box[0])) == pytest.approx(float(scripted(positions[0], box[0])), rel=1e-12)
    (tmp_path / "junk.pt").write_text("not a zip")
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        read_metadata(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "absent.pt")


def test_checkpoint_round_trip(liquid, model, tmp_path):
    optimizer = torch.optim.Adam(model.net.parameters(), lr=1e-3)
    save_checkpoint(tmp_path, model, optimizer.state_dict(), epoch=3, extra={"best_val": 1.5})
    hparams = json.loads((tmp_path / "hparams.json").read_text())
    assert hparams["features"] == 32 and hparams["bead_type_names"] == liquid.bead_type_names
    assert json.loads((tmp_path / "prior.json").read_text()) == model.prior.to_dict()
    payload = read_checkpoint(tmp_path)
    assert payload["epoch"] == 3 and payload["best_val"] == 1.5 and "optimizer" in payload
    loaded = load_model(tmp_path)
    positions, box, bead_type, molecules = tensors(liquid)
    torch.testing.assert_close(loaded(positions, box, bead_type, molecules), model(positions, box, bead_type, molecules))
    with pytest.raises(ValueError, match="would replace"):
        save_checkpoint(tmp_path, model, extra={"epoch": 1})


def test_load_model_errors(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "checkpoint.pt").write_text("garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_model(tmp_path)
    save_checkpoint(tmp_path, model)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    payload["hparams"]["mystery"] = 1
    torch.save(payload, tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint.pt.sha256").unlink()  # else the edit is refused as a corrupt checkpoint
    with pytest.raises(ValueError, match="unknown field"):
        load_model(tmp_path)
    payload["hparams"].pop("mystery")
    payload["hparams"]["features"] = 16
    torch.save(payload, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="weights do not match"):
        load_model(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="neighbor_backend"):
        HybridGraphConfig.quick(3, neighbor_backend="octree")
    with pytest.raises(ValueError, match="inter_cutoff_nm"):
        HybridGraphConfig.quick(3, inter_cutoff_nm=-1.0)
    with pytest.raises(ValueError, match="bead_type_names"):
        HybridGraphConfig.quick(3, bead_type_names=["A:B"])
    config = HybridGraphConfig.reference(5)
    assert (config.features, config.filters, config.n_gaussians, config.intra_blocks, config.inter_blocks) == (240, 256, 80, 3, 2)
    assert HybridGraphConfig.from_dict(config.to_dict()) == config


def test_synthetic_model_dir_for_later_stages(tmp_path):
    from openmm_cgnn.testing.cg_models import write_synthetic_model_dir

    model_dir, cg = write_synthetic_model_dir(tmp_path / "m", use_temperature=True)
    assert {p.name for p in model_dir.iterdir()} >= {"checkpoint.pt", "hparams.json", "prior.json", "model.pt"}
    metadata = read_metadata(model_dir / "model.pt")
    assert metadata["uses_temperature"] and metadata["temperature_K"] == 300.0
    eager = load_model(model_dir)
    eager.set_temperature(300.0)
    positions, box, bead_type, molecules = tensors(cg, dtype=torch.float64)
    scripted = torch.jit.load(str(model_dir / "model.pt"))
    expected = eager(positions[:1], box[:1], bead_type, molecules)
    assert float(scripted(positions[0], box[0])) == pytest.approx(float(expected[0].detach()), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["dense", "cell"])
def test_scripted_model_captures_in_a_cuda_graph(model, backend):
    """host_checks=False must be free of host synchronisation (openmm-torch useCUDAGraphs)."""
    cg = ionic_liquid(n_pairs=40, box_nm=2.9, frames=2, seed=13, jitter_nm=0.04)
    positions, box, bead_type, molecules = tensors(cg, dtype=torch.float32)
    module = script_for_system(model, bead_type, molecules, neighbor_backend=backend, box=box[0], host_checks=False,
                               max_pairs_per_bead=48.0).cuda()
    module = torch.jit.freeze(module.eval())
    static_positions = positions[0].cuda().clone().requires_grad_(True)
    static_box = box[0].cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up, as openmm-torch does before capturing
            static_positions.grad = None
            module(static_positions, static_box).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_positions.grad = None
    with torch.cuda.graph(graph):
        static_energy = module(static_positions, static_box)
        static_energy.backward()
    for frame in range(2):
        with torch.no_grad():
            static_positions.copy_(positions[frame].cuda())
        graph.replay()
        torch.cuda.synchronize()
        energy, forces = model.cuda().energy_and_forces(positions[frame:frame + 1].cuda(), box[:1].cuda(),
                                                        bead_type.cuda(), molecules.cuda())
        model.cpu()
        assert float(static_energy) == pytest.approx(float(energy[0]), rel=1e-4)
        torch.testing.assert_close(-static_positions.grad, forces[0], rtol=1e-3, atol=1e-3 * float(forces.abs().max()))
