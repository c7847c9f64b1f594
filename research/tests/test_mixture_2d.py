"""2-D distillation with the `sim` divergence: a one-step generator must cover every mode of a Gaussian mixture.

The teacher is the four-mode mixture of `research.toy2d.default_mixture` (weights 0.4 / 0.3 / 0.2 / 0.1) with an
exact diffused score; generator and fake score are small MLPs started from the teacher (see toy2d's docstring). The
thresholds come from reference samplers measured here, not from the trained run:
- energy distance below 10 times its noise floor (two exact sample sets of the same size). A sampler that misses only
  the 0.1 mode scores more than 3 times that threshold (asserted below), so passing rules out losing a mode;
- every mode holds at least half of its true weight (mode collapse drives one of these ratios to zero);
- total variation between the mode fractions (off-mode samples counted as a fifth bin) and the true weights below 0.2,
  the TV of a sampler that ignores the weights (equal weights); the teacher-initialised generator starts near 0.8.
About 20-40 s on two busy CPU cores.
"""

import torch

from research.toy2d import GaussianMixture2D, Toy2DConfig, default_mixture, energy_distance, evaluate, train

ENERGY_FLOOR_FACTOR = 10.0
MIN_COVERAGE = 0.5
MAX_TOTAL_VARIATION = 0.2
N_EVAL = 4000


def test_sim_covers_every_mode_of_a_2d_mixture():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads only add overhead
    try:
        mixture = default_mixture()
        generator, log = train(Toy2DConfig(divergence="sim", seed=0), mixture)
        result = evaluate(generator, mixture, n=N_EVAL)

        # The energy threshold is strict enough to catch a lost mode.
        threshold = ENERGY_FLOOR_FACTOR * result["energy_floor"]
        without_smallest = GaussianMixture2D(mixture.means[:3], mixture.stds[:3], mixture.weights[:3])
        rng = torch.Generator().manual_seed(7)
        assert energy_distance(without_smallest.sample(N_EVAL, rng), mixture.sample(N_EVAL, rng)) > 3 * threshold

        assert log["skipped_steps"] == 0
        assert result["energy"] < threshold, result
        assert result["min_coverage"] > MIN_COVERAGE, result
        assert result["total_variation"] < MAX_TOTAL_VARIATION, result
    finally:
        torch.set_num_threads(threads)
