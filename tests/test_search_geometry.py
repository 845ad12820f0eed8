"""The search geometry `align` uses (core.gallery.search_geometry): band, steps and margin defaults."""

import itertools

import numpy as np
import pytest

from deepalign_cli.core import gallery


def test_defaults_without_settings_follow_the_paper_pixel_and_crowther():
    """32 px at 10.16 Å: band 3 px = 30.5 Å, step atan(30.5 / 325) = 5.36°, psi = step, margin 2·0.77·step."""
    geo = gallery.search_geometry(32, 10.15625)
    assert geo.resolution_ang == pytest.approx(30.46875)
    assert geo.angular_step_deg == pytest.approx(np.rad2deg(np.arctan(30.46875 / 325.0)))
    assert geo.psi_step_deg == geo.angular_step_deg
    assert geo.margin_deg == pytest.approx(2 * 0.77 * geo.angular_step_deg)


def test_lowpass_wins_over_target_resolution_and_neither_goes_past_nyquist():
    assert gallery.search_geometry(64, 2.0, lowpass_resolution_ang=12.0, target_resolution_ang=9.0).resolution_ang == 12.0
    assert gallery.search_geometry(64, 2.0, target_resolution_ang=9.0).resolution_ang == 9.0
    assert gallery.search_geometry(64, 2.0, lowpass_resolution_ang=1.0).resolution_ang == 4.0  # Nyquist: 2 px


def test_margin_is_the_config_margin_unless_the_lattice_needs_more():
    assert gallery.search_geometry(64, 2.0, angular_step_deg=1.0, min_margin_deg=5.0).margin_deg == 5.0
    assert gallery.search_geometry(64, 2.0, angular_step_deg=10.0, min_margin_deg=5.0).margin_deg == pytest.approx(15.4)
    assert gallery.border_margin_deg(10.0) == pytest.approx(2 * gallery.COVERING_RADIUS_FACTOR * 10.0)


def _align_before(box, pixel, lowpass, target, step, psi, region_margin):
    """The formulas `commands/align.py` used inline before search_geometry existed."""
    resolution = lowpass or target or 3.0 * pixel
    resolution = max(resolution, 2 * pixel)
    step = step or gallery.default_angular_step_deg(resolution, box * pixel)
    psi = psi or step
    return resolution, step, psi, max(region_margin, 2 * gallery.COVERING_RADIUS_FACTOR * step)


@pytest.mark.parametrize("box, pixel", [(32, 10.15625), (120, 1.7), (65, 5.0)])
def test_geometry_equals_the_formulas_align_used_before(box, pixel):
    for lowpass, target, step, psi, margin in itertools.product((None, 0.0, 1.0, 25.0), (None, 8.0), (None, 0.0, 3.0),
                                                                (None, 2.0), (0.0, 5.0)):
        geo = gallery.search_geometry(box, pixel, lowpass_resolution_ang=lowpass, target_resolution_ang=target,
                                      angular_step_deg=step, psi_step_deg=psi, min_margin_deg=margin)
        assert tuple(geo) == _align_before(box, pixel, lowpass, target, step, psi, margin)
