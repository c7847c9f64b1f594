"""The tolerance ball of the regression term that `research.screen --regression_tolerance` screened. It changed
nothing, so the package's `regression_loss` dropped the option; `research._common.tolerant_regression_loss` has it."""

import pytest
import torch

from research._common import tolerant_regression_loss
from sim_diffusers.losses import regression_loss


@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_regression_tolerance_frees_the_ball_and_shortens_the_pull_outside_it(distance):
    """Within `tolerance` of the target: zero loss and zero gradient. Beyond it: the distance of a difference shortened
    by the tolerance, so the pull points at the target as before."""
    target = torch.zeros(2, 4, 4, 4)
    direction = torch.randn(2, 4, 4, 4)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    norms = torch.tensor([0.5, 3.0]).view(-1, 1, 1, 1)
    x0 = (norms * direction).requires_grad_(True)
    loss = tolerant_regression_loss(x0, target, distance, 0.5, tolerance=1.0)
    assert loss[0].item() == 0
    assert torch.allclose(loss[1], regression_loss(2.0 * direction[1:], target[1:], distance, 0.5)[0])
    loss.sum().backward()
    assert x0.grad[0].abs().max() == 0
    cosine = torch.nn.functional.cosine_similarity(x0.grad[1].flatten(), direction[1].flatten(), dim=0)
    assert cosine > 0.999  # descending it moves the sample straight at its target
    no_ball = tolerant_regression_loss(x0, target, distance, 0.5, tolerance=0.0)
    assert torch.equal(no_ball, regression_loss(x0, target, distance, 0.5))
    with pytest.raises(ValueError, match="tolerance"):
        tolerant_regression_loss(x0, target, distance, 0.5, tolerance=-1.0)
