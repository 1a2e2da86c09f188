import numpy as np
import pytest

from openmm_cgnn.analysis.msd import (
    NOT_CONVERGED,
    fit_diffusion,
    frame_interval,
    msd_curve,
    msd_per_particle,
    remove_drift,
    unwrap,
    yeh_hummer_correction,
)


def _brownian(seed, n_frames=1000, n=100, D=0.05, dt=1.0):
    rng = np.random.default_rng(seed)
    steps = rng.normal(scale=np.sqrt(2 * D * dt), size=(n_frames, n, 3))
    return np.cumsum(steps, axis=0) + rng.uniform(0, 3, size=(1, n, 3))


def test_fft_msd_matches_direct_average_over_time_origins():
    x = _brownian(0, n_frames=60, n=3)
    direct = np.array([
        [0.0 if m == 0 else np.mean(np.sum((x[m:, i] - x[:-m, i]) ** 2, axis=-1)) for i in range(3)]
        for m in range(60)
    ])
    np.testing.assert_allclose(msd_per_particle(x), direct, atol=1e-9)


def test_unwrap_undoes_periodic_wrapping():
    x = _brownian(1, n_frames=300, n=20, D=0.01)  # steps well below half a box
    length = 2.0
    box = np.tile(np.eye(3) * length, (300, 1, 1))
    restored = unwrap(x % length, box)
    shift = (restored - x) / length  # a constant whole number of boxes per particle
    np.testing.assert_allclose(shift, np.round(shift[:1]).repeat(300, axis=0), atol=1e-9)


def test_brownian_walkers_through_wrapping_recover_known_D():
    D, length, n = 0.05, 3.0, 100  # nm^2/ps
    x = _brownian(2, n=n, D=D)
    box = np.tile(np.eye(3) * length, (len(x), 1, 1))
    tracks = remove_drift(unwrap(x % length, box), np.ones(n))
    result = fit_diffusion(msd_curve(tracks, np.arange(len(x)) * 1.0), 300.0, length)
    assert result.status == "ok", result.reason
    expected = D * (1 - 1 / n) * 1e-6  # m^2/s; removing the centre-of-mass drift takes 1/N
    assert abs(result.D_m2_s - expected) < 4 * result.D_err_m2_s
    assert result.D_err_m2_s < 0.1 * expected
    assert result.fit_start_ps < result.fit_end_ps <= 0.3 * 999 + 1e-9
    assert result.box_nm == length


def test_drift_removal():
    D, n = 0.05, 100
    x = _brownian(3, n=n, D=D)
    drifted = x + 0.02 * np.arange(len(x))[:, None, None]  # the whole box flows at 0.02 nm/ps
    masses = np.random.default_rng(0).uniform(10, 100, n)
    curve = msd_curve(remove_drift(drifted, masses), np.arange(len(x)) * 1.0)
    result = fit_diffusion(curve, 300.0, 3.0)
    assert result.status == "ok"
    assert result.D_m2_s == pytest.approx(D * 1e-6, rel=0.15)
    # Without removal the MSD is ballistic at long lags and no D is reported.
    assert fit_diffusion(msd_curve(drifted, np.arange(len(x)) * 1.0), 300.0, 3.0).status == NOT_CONVERGED


def test_caged_particles_are_not_converged():
    # Ornstein-Uhlenbeck particles tied to fixed sites: the MSD plateaus, there is no diffusion.
    rng = np.random.default_rng(4)
    n_frames, n = 600, 50
    x = np.zeros((n_frames, n, 3))
    for t in range(1, n_frames):
        x[t] = 0.8 * x[t - 1] + rng.normal(scale=0.05, size=(n, 3))
    result = fit_diffusion(msd_curve(x, np.arange(n_frames) * 0.5), 300.0, 3.0)
    assert result.status == NOT_CONVERGED
    assert result.D_m2_s is None and result.D_err_m2_s is None
    assert "no diffusive regime" in result.reason


def test_too_short_run_is_not_converged():
    x = _brownian(5, n_frames=10, n=50)
    result = fit_diffusion(msd_curve(x, np.arange(10) * 1.0), 300.0, 3.0)
    assert result.status == NOT_CONVERGED and result.D_m2_s is None
    assert "too short" in result.reason


def test_single_molecule_gives_no_silent_number():
    x = _brownian(6, n=1)
    result = fit_diffusion(msd_curve(x, np.arange(len(x)) * 1.0), 300.0, 3.0)
    assert result.status == NOT_CONVERGED and result.D_m2_s is None


def test_yeh_hummer_correction():
    # xi kB T / (6 pi eta L) for T = 300 K, eta = 1 mPa s, L = 3 nm, worked out by hand: 2.078e-10 m^2/s.
    assert yeh_hummer_correction(300.0, 1e-3, 3.0) == pytest.approx(2.078e-10, rel=1e-3)
    x = _brownian(7)
    result = fit_diffusion(msd_curve(x, np.arange(len(x)) * 1.0), 300.0, 3.0, viscosity_pa_s=1e-3)
    assert result.D_yeh_hummer_m2_s == pytest.approx(result.D_m2_s + 2.078e-10, rel=1e-3)
    with pytest.raises(ValueError, match="viscosity"):
        yeh_hummer_correction(300.0, 0.0, 3.0)


def test_uneven_time_spacing_is_an_error():
    with pytest.raises(ValueError, match="not evenly spaced"):
        frame_interval(np.array([0.0, 1.0, 2.0, 4.0]), "run/frames.h5")


def test_cage_then_diffusion_fits_the_late_regime():
    # Particles rattle in a cage (radius 0.2 nm, 5 ps) whose centre diffuses slowly: the MSD has a
    # plateau between two slope-1 stretches, and only the late one is the self-diffusion.
    rng = np.random.default_rng(8)
    n_frames, n, dt, D_site, tau, radius = 3000, 100, 0.5, 0.002, 5.0, 0.2
    site = np.cumsum(rng.normal(scale=np.sqrt(2 * D_site * dt), size=(n_frames, n, 3)), axis=0)
    decay = np.exp(-dt / tau)
    cage = np.zeros((n_frames, n, 3))
    for t in range(1, n_frames):
        cage[t] = decay * cage[t - 1] + rng.normal(scale=radius * np.sqrt(1 - decay**2), size=(n, 3))
    result = fit_diffusion(msd_curve(site + cage, np.arange(n_frames) * dt), 300.0, 3.0)
    assert result.status == "ok", result.reason
    assert result.fit_start_ps > 4 * tau
    assert abs(result.D_m2_s - D_site * 1e-6) < 4 * result.D_err_m2_s + 0.05 * D_site * 1e-6
