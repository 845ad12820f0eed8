"""PNG plots: written, valid PNGs, also for degenerate inputs real runs produce."""

import numpy as np

from deepalign_cli import plots


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_histogram_of_float32_values_narrower_than_the_bins(tmp_path):
    # predict's top-region probabilities of barely trained nets: float32 values within a few ulps
    # of 0.5 (numpy refuses 50 bins over them in float32; a real CPU run of `predict` crashed here)
    values = np.float32(0.5) + np.arange(4, dtype=np.float32) * np.float32(6e-8)
    out = plots.histogram(tmp_path / "h.png", values, "p", "t")
    assert _is_png(out)
    for v in (np.full(5, 0.5, np.float32), np.array([np.nan, 1.0]), np.zeros(0, np.float32)):
        assert _is_png(plots.histogram(tmp_path / "g.png", v, "p", "t"))
