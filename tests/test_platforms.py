"""One home for OpenMM platforms: the messages when one is missing, properties, ``openmm-cgnn info``."""

from __future__ import annotations

import json

import pytest

import openmm_cgnn  # noqa: F401  (torch before openmm)
from openmm_cgnn import platforms
from openmm_cgnn.cli import main

CUDA_HINT = 'pip install -e ".[cuda12]"'


def test_a_missing_platform_is_one_line_naming_the_option_with_the_install_command():
    with pytest.raises(platforms.PlatformError) as caught:
        platforms.get_platform("NoSuchPlatform", "--platform")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--platform NoSuchPlatform:")
    assert "available: Reference" in message and CUDA_HINT in message


@pytest.mark.skipif("CUDA" in platforms.available_platforms(), reason="CUDA is installed here")
def test_missing_cuda_names_the_extra():
    message = platforms.missing_message("CUDA", "--platform")
    assert "no platform 'CUDA'" in message and CUDA_HINT in message


def test_plugin_load_failures_are_in_the_message(monkeypatch):
    import openmm

    failure = "Error loading library /x/plugins/libOpenMMCUDA.so: libcuda.so.1: cannot open shared object file"
    monkeypatch.setattr(openmm.Platform, "getPluginLoadFailures", staticmethod(lambda: (failure, "libOpenMMOpenCL.so: no")))
    message = platforms.missing_message("CUDA", "--platform")
    assert f"plugin load failures: {failure}" in message
    assert "OpenCL" not in message.split("plugin load failures:")[1]  # only the failures of the platform asked for


def test_get_platform_defaults_and_properties():
    assert platforms.get_platform("Reference").getName() == "Reference"
    assert platforms.get_platform(None, candidates=("CPU", "Reference")).getName() == "CPU"  # the faster one
    assert platforms.platform_properties("CUDA") == {"Precision": "mixed"}
    assert platforms.platform_properties("CUDA", precision="double") == {"Precision": "double"}
    assert platforms.platform_properties(platforms.get_platform("CPU"), threads=2) == {"Threads": "2"}
    assert platforms.platform_properties("Reference") == {}
    v = platforms.versions()
    assert {"openmm_cgnn", "openmm", "openmmtorch", "torch", "python", "numpy"} <= set(v)


def test_stages_report_a_missing_platform_in_one_line(tmp_path, capsys):
    from openmm_cgnn.openmm.simulation import SimulationError, choose_platform

    with pytest.raises(SimulationError, match=r"--platform CUDA9: .*pip install"):
        choose_platform("CUDA9")
    out = tmp_path / "aa"
    code = main(["aa", "--pairs", "4", "--temperature", "400", "--equilibrate-ps", "1", "--production-ps", "0.4",
                 "--save-every-ps", "0.1", "--platform", "CUDA9", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--platform CUDA9" in err[0] and CUDA_HINT in err[0]
    assert not out.exists()


def test_info_and_version(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "platforms:" in text and "Reference" in text and "plugin load failures" in text
    for failure in platforms.plugin_load_failures():
        assert failure in text
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["platforms"]["Reference"]["usable"] is True
    assert data["versions"]["openmm_cgnn"] == openmm_cgnn.__version__
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"openmm-cgnn {openmm_cgnn.__version__}\n")
