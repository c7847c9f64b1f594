"""The validation's statistics (`sim_diffusers.diversity`) on hand-made sample sets whose answer is known."""

import pytest
import torch

from sim_diffusers.diversity import diversity_ratio, paired_distance, prompt_statistics, spread, teacher_agreement

N = 16
SHAPE = (4, 8, 8)


def teacher_set(seed=0, n=N):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def two_modes(n_first: int, n_second: int, separation: float = 10.0) -> torch.Tensor:
    """n_first samples at a, n_second at b, with |a - b| = separation."""
    a = torch.zeros(SHAPE)
    b = torch.zeros(SHAPE)
    b[0, 0, 0] = separation
    return torch.stack([a] * n_first + [b] * n_second)


def test_identical_samples_have_ratio_0_and_the_teachers_own_samples_ratio_1():
    teacher = teacher_set()
    collapsed = teacher[3:4].expand(N, *SHAPE)  # every noise sent to one of the teacher's samples
    assert diversity_ratio(collapsed, teacher) == 0.0
    assert diversity_ratio(teacher, teacher) == pytest.approx(1.0, abs=1e-12)
    assert teacher_agreement(teacher, teacher) == 0.0


def test_a_known_two_mode_split_gives_the_ratio_of_pair_counts():
    """Teacher 8 : 8 over two modes, generator 12 : 4 on the same noises. Mean pairwise distance = separation x the
    share of pairs across modes: teacher 64 / 120, generator 48 / 120, so the ratio is 48 / 64 = 0.75
    (v (1 - v) / (w (1 - w)) with v = 3/4, w = 1/2)."""
    teacher, generator = two_modes(8, 8), two_modes(12, 4)
    assert spread(teacher) == pytest.approx(10.0 * 64 / 120)
    assert diversity_ratio(generator, teacher) == pytest.approx(0.75)
    # Collapsed onto the first mode: 8 of 16 samples are a whole separation from their teacher sample.
    all_first = two_modes(16, 0)
    assert diversity_ratio(all_first, teacher) == 0.0
    assert paired_distance(all_first, teacher) == pytest.approx(5.0)
    assert teacher_agreement(all_first, teacher) == pytest.approx(5.0 / (10.0 * 64 / 120))  # (N - 1) / N = 15/16


def test_statistics_do_not_depend_on_the_latent_scale_and_see_a_blur():
    teacher = teacher_set()
    generator = 0.5 * teacher + 0.1 * teacher_set(1)
    stats = prompt_statistics(generator, teacher)
    scaled = prompt_statistics(3.0 * generator, 3.0 * teacher)
    assert scaled["diversity_ratio"] == pytest.approx(stats["diversity_ratio"])
    assert scaled["teacher_agreement"] == pytest.approx(stats["teacher_agreement"])
    assert scaled["teacher_spread"] == pytest.approx(3.0 * stats["teacher_spread"])
    # Shrinking every sample towards the same point halves the spread exactly.
    assert diversity_ratio(0.5 * teacher, teacher) == pytest.approx(0.5)


def test_independent_teacher_like_samples_are_as_diverse_but_do_not_agree():
    """A generator that ignores which noise it got but keeps the teacher's distribution: ratio near 1, agreement
    near 1 (as far from the teacher's sample as an unrelated one); large N so the estimate is tight."""
    teacher, other = teacher_set(0, 400), teacher_set(1, 400)
    stats = prompt_statistics(other, teacher)
    assert stats["diversity_ratio"] == pytest.approx(1.0, abs=0.02)
    assert stats["teacher_agreement"] == pytest.approx(1.0, abs=0.02)


def test_bad_sample_sets_are_refused():
    with pytest.raises(ValueError, match="at least 2 samples"):
        spread(teacher_set()[:1])
    with pytest.raises(ValueError, match="differ in shape"):
        teacher_agreement(teacher_set()[:8], teacher_set())
