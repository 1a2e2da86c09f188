import pytest
import torch  # noqa: F401  (before openmm: see openmm_cgnn/__init__.py)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # The test models are tiny: one thread is faster than two fighting over the CI machine's
    # two cores with OpenMM's own CPU threads.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def cg():
    """The toy CG liquid of tests/models (its mapping, prior and TorchScript models are built for it)."""
    from models.make_models import toy_cg_system

    return toy_cg_system()


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """model.pt without prior + prior.json + mapping.json, as an export directory holds them."""
    import shutil

    from models.make_models import HERE as models

    folder = tmp_path_factory.mktemp("toy")
    shutil.copy(models / "pair_model.pt", folder / "model.pt")
    shutil.copy(models / "toy_prior.json", folder / "prior.json")
    shutil.copy(models / "toy_mapping.json", folder / "mapping.json")
    return folder
