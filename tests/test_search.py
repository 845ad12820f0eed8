"""Galleries and the restricted correlation search (`align` core) on simulated particles.

Error bounds used below (step = direction step, psi_step = in-plane step, both 10° here):
* Coarse grid: the Fibonacci lattice leaves no direction further than 0.77·step from a lattice point
  (gallery.COVERING_RADIUS_FACTOR, measured) and psi is at most psi_step/2 off; a direction error δ
  and an in-plane error ε compose to a rotation of ≈ sqrt(δ² + ε²), so the nearest grid pose is
  within sqrt((0.77·step)² + psi_step²/4) = 9.2°.
* Refinement: pass p searches a 3-point grid of half-width step/2^p on each of the three rotation
  axes; after 3 passes the grid spacing is step/8, so each axis is off by ≤ step/16 and the pose by
  ≤ √3·step/16 = 1.1° — the median threshold of the noise-free test. Shifts: the last pass has a
  1/8 px grid, far inside the required 1 px.
"""

import jax
import mrcfile
import numpy as np
import pytest

from deepalign_cli.core import alignment, gallery, geometry, preprocess, projector, regions, score, search, symmetry
from deepalign_cli.core.ctf import ctf_2d

MAP = "/work/shared/data/ribosome70S_65.mrc"
BOX = 32
PIXEL = 5.0 * 65 / BOX
STEP = 10.0
PSI_STEP = 10.0
MAX_SHIFT = 4.0
COARSE_BOUND = float(np.hypot(gallery.COVERING_RADIUS_FACTOR * STEP, PSI_STEP / 2))
REFINED_BOUND = float(np.sqrt(3) * STEP / 2**search.REFINE_PASSES / 2)
C1 = symmetry.symmetry_operators("C1")
CENTRES = regions.region_centres(30.0, C1)
POLE_REGION = 0  # centre (rot 0, tilt 0)
ROT_ZERO_REGION = 17  # centre (rot 0, tilt 90): the region straddles rot = 0/360
CTF_KW = dict(voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)


@pytest.fixture(scope="module")
def vol_ft():
    vol = mrcfile.read(MAP).astype(np.float32)
    return projector.prepare_volume(preprocess.fourier_crop_volume(vol, BOX))


def _directions_in_region(rng, region, n):
    lat = gallery.sphere_lattice(1.0)
    idx, _ = regions.assign_regions(lat, CENTRES, C1)
    inside = lat[idx == region]
    return inside[rng.choice(len(inside), n, replace=False)]


def _particles(vol_ft, seed, n, region, snr=None):
    """Particles with known poses whose directions lie in `region`: CTF, origins ≤ 3 px, noise."""
    rng = np.random.default_rng(seed)
    rot, tilt = geometry.direction_to_angles(_directions_in_region(rng, region, n))
    eulers = np.stack([rot, tilt, rng.uniform(-180, 180, n)], axis=1)
    origins = rng.uniform(-3, 3, (n, 2)).astype(np.float32)
    defocus = rng.uniform(10000, 25000, n)
    ctf = np.asarray(ctf_2d(BOX, PIXEL, defocus, defocus, 0.0, **CTF_KW))
    ft = np.asarray(projector.project_ft(vol_ft, geometry.eulers_to_matrices(eulers).astype(np.float32), origins))
    images = np.real(np.fft.ifft2(ft * ctf)).astype(np.float32)
    if snr is not None:
        images = np.asarray(preprocess.add_noise(jax.random.key(seed), images, snr))
    params = dict(defocus_u_ang=defocus, defocus_v_ang=defocus, defocus_angle_deg=np.zeros(n), **CTF_KW)
    return images, eulers, origins, params


def _align(vol_ft, images, params, candidates, **kw):
    opts = dict(pixel_size_ang=PIXEL, angular_step_deg=STEP, psi_step_deg=PSI_STEP, margin_deg=5.0,
                max_shift_px=MAX_SHIFT, ctf_params=params)
    return alignment.align_particles(images, vol_ft, candidates, CENTRES, C1, **{**opts, **kw})


def _errors(out, eulers):
    err = geometry.rotation_distance_deg(geometry.eulers_to_matrices(out["eulers_deg"]), geometry.eulers_to_matrices(eulers))
    return np.asarray(err)


GAL_STEP = 5.0
# a direction on a region border is ≤ 0.77·step from a lattice point ≤ 2·0.77·step past the border
GAL_MARGIN = 2 * gallery.COVERING_RADIUS_FACTOR * GAL_STEP


def _covered(gal, truth, step):
    """Every truth direction has a gallery direction within the lattice covering radius."""
    ang = np.rad2deg(np.arccos(np.clip(truth @ gal.T, -1, 1))).min(axis=1)
    return np.all(ang <= gallery.COVERING_RADIUS_FACTOR * step)


def test_default_angular_step_follows_crowther():
    assert gallery.default_angular_step_deg(10.0, 400.0) == pytest.approx(1.432, abs=1e-3)


def test_region_crossing_rot_zero_gallery_contains_truth_on_both_sides():
    gal = gallery.region_gallery(CENTRES, C1, ROT_ZERO_REGION, GAL_STEP, GAL_MARGIN)
    rot, _ = geometry.direction_to_angles(gal)
    assert (rot > 5).any() and (rot < -5).any()  # i.e. both rot ≈ 10° and rot ≈ 350°
    truth = _directions_in_region(np.random.default_rng(1), ROT_ZERO_REGION, 200)
    truth_rot, _ = geometry.direction_to_angles(truth)
    assert (truth_rot > 0).any() and (truth_rot < 0).any()
    assert _covered(gal, truth, GAL_STEP)


def test_pole_region_gallery_contains_truth_at_every_rot():
    gal = gallery.region_gallery(CENTRES, C1, POLE_REGION, GAL_STEP, GAL_MARGIN)
    rng = np.random.default_rng(2)
    truth = geometry.projection_direction(rng.uniform(-180, 180, 100), rng.uniform(0, 15, 100))
    assert np.all(regions.assign_regions(truth, CENTRES, C1)[0] == POLE_REGION)
    assert _covered(gal, truth, GAL_STEP)


def test_margin_extends_gallery_past_the_border():
    plain = gallery.region_gallery(CENTRES, C1, 5, 5.0, 0.0)
    wide = gallery.region_gallery(CENTRES, C1, 5, 5.0, 5.0)
    assert len(wide) > len(plain)
    own = regions.assign_regions(wide, CENTRES, C1)[1]
    dist5 = np.rad2deg(np.arccos(np.clip(wide @ CENTRES[5], -1, 1)))
    assert np.all(dist5 <= own + 5.0 + 1e-6)


def test_asymmetric_unit_gallery_covers_every_direction_up_to_symmetry():
    lattice = gallery.sphere_lattice(GAL_STEP)
    assert len(gallery.asymmetric_unit_gallery(CENTRES, C1, GAL_STEP)) == len(lattice)
    d2 = symmetry.symmetry_operators("D2")
    au = gallery.asymmetric_unit_gallery(regions.region_centres(30.0, d2), d2, GAL_STEP)
    # centres on a 2-fold axis keep both copies of their neighbourhood, hence up to ~1.5× of 1/G
    assert len(lattice) / 4 <= len(au) <= 1.5 * len(lattice) / 4
    truth = np.random.default_rng(6).normal(size=(300, 3))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    ang = symmetry.symmetric_direction_distance_deg(truth[:, None, :], au[None], d2).min(axis=1)
    assert np.all(ang <= gallery.COVERING_RADIUS_FACTOR * GAL_STEP)


def test_chunk_sizes_shrink_with_the_memory_budget():
    big = search.chunk_sizes(64, 1500, 81, 10000, 4.0)
    small = search.chunk_sizes(64, 1500, 81, 10000, 0.05)
    assert small[0] <= big[0] and small[1] < big[1] and min(small) >= 1


def test_restricted_search_recovers_true_poses_on_clean_data(vol_ft):
    images, eulers, origins, params = _particles(vol_ft, seed=3, n=12, region=5)
    candidates = np.array([[5, 6]] * 6 + [[4, 5]] * 6)  # region groups 4, 5, 6 of 6, 12, 6 particles
    n_coarse, n_refine = search.coarse_search._cache_size(), search.refine_poses._cache_size()
    coarse = _align(vol_ft, images, params, candidates, refine=False)
    refined = _align(vol_ft, images, params, candidates, refine=True)
    # the coarse program is shared by the groups and both refine settings: one per piece size
    sizes = set(search._binary_pieces(12, search.COARSE_CHUNK)) | set(search._binary_pieces(6, search.COARSE_CHUNK))
    assert search.coarse_search._cache_size() - n_coarse == len(sizes)
    assert search.refine_poses._cache_size() - n_refine == 1  # refinement runs in fixed chunks
    assert np.median(_errors(coarse, eulers)) <= COARSE_BOUND
    err = _errors(refined, eulers)
    assert np.median(err) <= REFINED_BOUND and err.max() <= COARSE_BOUND
    assert np.abs(refined["origins_px"] - origins).max() <= 1.0
    assert np.all(refined["region"] == 5) and np.all(refined["score"] > 0.9)


def test_noisy_search_error_stays_bounded(vol_ft):
    images, eulers, origins, params = _particles(vol_ft, seed=4, n=24, region=9, snr=0.1)
    out = _align(vol_ft, images, params, np.array([[9, 10]] * 24))
    err = _errors(out, eulers)
    assert np.median(err) <= 5.0
    assert np.mean(err <= 10.0) >= 0.8
    good = err <= 10.0
    assert np.median(np.abs(out["origins_px"] - origins)[good]) <= 1.0


def test_restricted_search_returns_the_exhaustive_pose(vol_ft):
    images, eulers, _, params = _particles(vol_ft, seed=5, n=4, region=20, snr=1.0)
    restricted = _align(vol_ft, images, params, np.array([[20, 21]] * 4), angular_step_deg=15.0, psi_step_deg=15.0)
    exhaustive = _align(vol_ft, images, params, None, angular_step_deg=15.0, psi_step_deg=15.0, exhaustive=True)
    diff = geometry.rotation_distance_deg(geometry.eulers_to_matrices(restricted["eulers_deg"]),
                                          geometry.eulers_to_matrices(exhaustive["eulers_deg"]))
    assert np.all(np.asarray(diff) < 0.01)
    np.testing.assert_allclose(restricted["origins_px"], exhaustive["origins_px"], atol=1e-3)
    np.testing.assert_allclose(restricted["score"], exhaustive["score"], atol=1e-4)


def test_band_references_equal_projector_slices(vol_ft):
    rotmats = geometry.eulers_to_matrices(np.array([[10.0, 80.0, 30.0], [200.0, 5.0, -90.0]])).astype(np.float32)
    band = score.fourier_band(BOX, PIXEL)  # up to Nyquist, including the kx = -N/2 column
    full = np.asarray(projector.project_ft(vol_ft, rotmats)).reshape(2, -1)[:, np.asarray(band.flat_index)]
    np.testing.assert_allclose(np.asarray(score.band_projections(vol_ft, band, rotmats)), full, rtol=1e-4, atol=1e-4 * np.abs(full).max())


def test_table_cache_projects_once_per_run_and_changes_no_pose(vol_ft):
    images, eulers, _, params = _particles(vol_ft, seed=7, n=8, region=12, snr=1.0)
    cands = np.array([[12, 13]] * 4 + [[12, 11]] * 4)
    halves = (slice(0, 4), slice(4, 8))
    plain = [_align(vol_ft, images[h], {k: v[h] if np.ndim(v) else v for k, v in params.items()}, cands[h]) for h in halves]
    cache: dict = {}
    cached = [_align(vol_ft, images[h], {k: v[h] if np.ndim(v) else v for k, v in params.items()}, cands[h], table_cache=cache)
              for h in halves]
    assert len(cache) == 1
    assert cached[0]["seconds"]["project"] > 0 and cached[1]["seconds"]["project"] == 0.0  # second chunk: no projection
    for p, c in zip(plain, cached):
        np.testing.assert_allclose(p["eulers_deg"], c["eulers_deg"], atol=1e-4)
        np.testing.assert_allclose(p["score"], c["score"], atol=1e-5)


def test_particles_whose_candidates_cover_the_unit_are_searched_whole(vol_ft):
    lattice = gallery.sphere_lattice(15.0)
    every = np.arange(len(CENTRES))
    cands = np.full((4, len(CENTRES)), -1)
    cands[:2, :2] = [20, 21]  # two regions: a tenth of the sphere
    cands[2:] = every  # every region: the margins make the sum ~1.5× the sphere
    wide = alignment.wide_candidate_particles(cands, 4, lattice, CENTRES, C1, 5.0)
    assert wide.tolist() == [False, False, True, True]
    # a region listed twice counts once; a whole-sphere margin makes even one region "wide"
    assert not alignment.wide_candidate_particles(np.array([[20, 20, 20]]), 1, lattice, CENTRES, C1, 5.0)[0]
    assert alignment.wide_candidate_particles(np.array([[20]]), 1, lattice, CENTRES, C1, 180.0)[0]
    # cost counts padded reference rows: at 7.5° with align's 11.55° margin, 20 of 42 regions hold
    # ~90 % of the unit's directions, but their 48 psi each padded to 512-row chunks cost more
    twenty = np.arange(20)[None]
    fine = gallery.sphere_lattice(7.5)
    assert not alignment.wide_candidate_particles(twenty, 1, fine, CENTRES, C1, 11.55)[0]
    assert alignment.wide_candidate_particles(twenty, 1, fine, CENTRES, C1, 11.55, n_psi=48, row_chunk=512)[0]

    images, _, _, params = _particles(vol_ft, seed=8, n=4, region=20, snr=1.0)
    seen = []
    mixed = _align(vol_ft, images, params, cands, angular_step_deg=15.0, psi_step_deg=15.0, progress=seen.append)
    narrow = _align(vol_ft, images[:2], {k: v[:2] if np.ndim(v) else v for k, v in params.items()}, cands[:2, :2],
                    angular_step_deg=15.0, psi_step_deg=15.0)
    whole = _align(vol_ft, images[2:], {k: v[2:] if np.ndim(v) else v for k, v in params.items()}, None,
                   angular_step_deg=15.0, psi_step_deg=15.0, exhaustive=True)
    for key in ("eulers_deg", "origins_px", "score", "region"):
        np.testing.assert_allclose(mixed[key][:2], narrow[key], atol=1e-4)
        np.testing.assert_allclose(mixed[key][2:], whole[key], atol=1e-4)
    assert seen == sorted(seen) and seen[-1] == 4
    assert mixed["whole_unit"].tolist() == [False, False, True, True] and not narrow["whole_unit"].any() and whole["whole_unit"].all()
    assert mixed["seconds"]["project"] > 0


def test_a_handful_of_restricted_particles_among_wide_ones_is_searched_whole(vol_ft):
    """Below RESTRICTED_MIN_FRACTION of a call, the narrow particles join the whole-unit search."""
    cands = np.tile(np.arange(len(CENTRES)), (25, 1))
    cands[0, :] = -1
    cands[0, :2] = [20, 21]  # narrow: 1 of 25 = 4 % < 5 %
    images, _, _, params = _particles(vol_ft, seed=9, n=25, region=20, snr=1.0)
    assert alignment.RESTRICTED_MIN_FRACTION > 1 / 25
    mixed = _align(vol_ft, images, params, cands, angular_step_deg=15.0, psi_step_deg=15.0)
    whole = _align(vol_ft, images, params, None, angular_step_deg=15.0, psi_step_deg=15.0, exhaustive=True)
    assert mixed["whole_unit"].all()
    for key in ("eulers_deg", "origins_px", "score"):
        np.testing.assert_allclose(mixed[key], whole[key], atol=1e-4)


def test_coarse_chunk_follows_the_backend(monkeypatch):
    """32 particles per coarse GEMM on CPU, 256 on accelerators (each measured fastest there)."""
    assert search.coarse_chunk() == search.COARSE_CHUNK == 32
    monkeypatch.setattr(search.jax, "default_backend", lambda: "gpu")
    assert search.coarse_chunk() == search.COARSE_CHUNK_ACCEL == 256
