import numpy as np
import pytest

from openmm_cgnn.analysis.arrhenius import NOT_ENOUGH_TEMPERATURES, fit_arrhenius
from openmm_cgnn.units import MOLAR_GAS_CONSTANT_KJ_MOL_K


def _law(T, Ea=20.0, D0=1e-7):
    return D0 * np.exp(-Ea / (MOLAR_GAS_CONSTANT_KJ_MOL_K * T))


def test_exact_data_give_exact_activation_energy():
    T = np.array([350.0, 400.0, 450.0, 500.0])
    fit = fit_arrhenius(T, _law(T), 0.03 * _law(T))
    assert fit.status == "ok"
    assert fit.Ea_kJ_mol == pytest.approx(20.0, rel=1e-9)
    assert fit.D0_m2_s == pytest.approx(1e-7, rel=1e-9)
    np.testing.assert_allclose(fit.predict(T), _law(T), rtol=1e-9)


def test_noisy_data_recover_activation_energy_within_error():
    rng = np.random.default_rng(0)
    T = np.array([350.0, 380.0, 410.0, 440.0, 470.0, 500.0])
    pulls = []
    for _ in range(200):
        D = _law(T) * (1 + 0.05 * rng.normal(size=T.size))
        fit = fit_arrhenius(T, D, 0.05 * D)
        pulls.append((fit.Ea_kJ_mol - 20.0) / fit.Ea_err_kJ_mol)
    pulls = np.array(pulls)
    assert abs(pulls.mean()) < 0.25
    assert 0.7 < pulls.std() < 1.3  # the error bars are honest


def test_two_temperatures_with_errors_and_without():
    T = np.array([400.0, 500.0])
    D = _law(T)
    fit = fit_arrhenius(T, D, 0.05 * D)
    assert fit.status == "ok" and fit.Ea_kJ_mol == pytest.approx(20.0)
    # Propagated by hand: sigma(ln D) = 0.05 at both points.
    expected = MOLAR_GAS_CONSTANT_KJ_MOL_K * np.sqrt(2) * 0.05 / (1 / 400 - 1 / 500)
    assert fit.Ea_err_kJ_mol == pytest.approx(expected, rel=1e-6)
    assert fit_arrhenius(T, D).status == NOT_ENOUGH_TEMPERATURES  # no error bars: scatter needs 3


def test_not_enough_temperatures_is_explicit():
    fit = fit_arrhenius(np.array([400.0]), np.array([1e-11]), np.array([1e-12]))
    assert fit.status == NOT_ENOUGH_TEMPERATURES
    assert fit.Ea_kJ_mol is None and "1 temperature" in fit.reason
    with pytest.raises(ValueError, match="no Arrhenius law"):
        fit.predict(np.array([400.0]))
    empty = fit_arrhenius(np.array([]), np.array([]), np.array([]))
    assert empty.status == NOT_ENOUGH_TEMPERATURES


def test_bad_values_are_errors():
    with pytest.raises(ValueError, match="positive"):
        fit_arrhenius(np.array([400.0, 500.0]), np.array([1e-11, -1e-11]), np.array([1e-12, 1e-12]))
