"""The diagnostics of `research.diagnostics` on samples whose answer is known by construction."""

import math

import pytest
import torch

from research.diagnostics import band_widths, circle_crossings, off_mode_anatomy


def test_off_mode_anatomy_tells_global_blends_from_regions_that_follow_different_modes(world):
    on_mode = world.sample_x0(0, 64, torch.Generator().manual_seed(0))
    assert off_mode_anatomy(world, 0, on_mode) == {
        "off_mode": 0.0,
        "committed_nearest": 0.0,
        "committed_second": 0.0,
        "in_between": 0.0,
        "regionally_inconsistent": 0.0,
    }
    mu_a, mu_b = world.means[0][0], world.means[0][1]
    global_blend = (0.6 * mu_a + 0.4 * mu_b).expand(8, -1, -1, -1)
    blend = off_mode_anatomy(world, 0, global_blend)
    assert blend["off_mode"] == 1.0 and blend["in_between"] == 1.0 and blend["regionally_inconsistent"] == 0.0

    # Half of the contested blocks take mode a's value, the other half mode b's: a patchwork of the two modes.
    contested = torch.nonzero(world.patterns(mu_a[None])[0] != world.patterns(mu_b[None])[0]).flatten()
    take_b = torch.zeros(world.num_blocks, dtype=torch.bool)
    take_b[contested[: len(contested) // 2]] = True
    grid = (
        world.latent_shape[0],
        world.latent_shape[1] // world.block_size,
        world.latent_shape[2] // world.block_size,
    )
    mask = take_b.reshape(grid).repeat_interleave(world.block_size, 1).repeat_interleave(world.block_size, 2)
    patchwork = off_mode_anatomy(world, 0, torch.where(mask, mu_b, mu_a).expand(8, -1, -1, -1))
    assert patchwork["off_mode"] == 1.0 and patchwork["regionally_inconsistent"] == 1.0
    assert patchwork["in_between"] == 0.0
    assert patchwork["committed_nearest"] + patchwork["committed_second"] == pytest.approx(1.0)
    assert 0.3 < patchwork["committed_second"] <= 0.5


def test_band_widths_measure_the_off_mode_run_through_the_centre_of_each_line(world):
    offsets = torch.arange(-20, 21) * 0.05  # 0 at index 20
    mu_a, mu_b = world.means[0][0], world.means[0][1]
    blend = 0.5 * (mu_a + mu_b)

    def line(left, right, band=(-0.3, 0.2)):  # left mode below the band, right mode above, the blend inside
        picks = [left if u < band[0] else right if u > band[1] else blend for u in offsets.tolist()]
        return torch.stack(picks)

    lines = torch.stack([line(mu_a, mu_b), line(mu_a, mu_a), line(blend, blend), line(mu_b, mu_b, band=(0.5, 0.6))])
    result = band_widths(world, 0, lines, offsets)
    assert result["width"][0] == pytest.approx(0.5, abs=0.05 + 1e-6)  # the band is 0.5 wide
    assert result["between_modes"].tolist() == [True, False, False, False]  # the second is an excursion from mode a
    assert result["width"][1] == result["width"][0]
    assert result["censored"].tolist() == [False, False, True, False] and math.isnan(result["width"][2])
    assert result["width"][3] == 0.0  # the centre is on a mode: no band there
    jump = float((mu_a - blend).norm()) / 0.05
    assert result["max_slope"][0] == pytest.approx(jump, rel=1e-4) and result["max_slope"][2] == 0.0

    with pytest.raises(ValueError, match="offsets"):
        band_widths(world, 0, lines, offsets + 0.01)  # no 0: no off-mode sample to measure through


def test_circle_crossings_count_changes_of_mode_round_each_circle(world):
    mu_a, mu_b = world.means[0][0], world.means[0][1]
    off = 0.5 * (mu_a + mu_b)
    circles = torch.stack(
        [
            torch.stack(
                [mu_a, mu_a, off, mu_b, mu_b, mu_a, off, off]
            ),  # a -band- b, b -clean- a, then off and back to a
            torch.stack([mu_b, off, mu_b, mu_b, mu_b, mu_b, mu_b, mu_b]),  # one excursion, no crossing
            torch.stack([off] * 8),
        ]
    )
    assert circle_crossings(world, 0, circles) == {
        "circles": 3,
        "points": 24,
        "off_mode": 12,
        "crossings": 2,
        "clean": 1,
        "band_points": 1,
        "excursion_points": 3,
        "circles_off_mode": 1,
    }
    # Round the end of the circle is a crossing too.
    wrapped = torch.stack([mu_b, mu_b, mu_a, mu_a, off, off, off, off])[None]
    assert (
        circle_crossings(world, 0, wrapped)["crossings"] == 2
        and circle_crossings(world, 0, wrapped)["band_points"] == 4
    )
