"""Assigning ground-truth points to proposals for the detector loss (registry ``MATCHERS``).

Cost of pairing proposal ``i`` with ground truth ``j``:
``0.1 * ||p_i - g_j||_2 - prob_i(class of g_j)`` (probabilities of the nucleus/GT class).

* ``cheapest`` (the authors' code): every GT takes its single cheapest proposal; two GTs
  may share one proposal (not one-to-one).
* ``hungarian`` (P2PNet): optimal one-to-one assignment (scipy).

A matcher maps ``cost (P, G)`` to ``(proposal_idx (M,), gt_idx (M,))`` int64 tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from denuc.registry import Registry

Matcher = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
MATCHERS: Registry[Matcher] = Registry("matcher")

DIST_WEIGHT = 0.1


def match_cost(points: torch.Tensor, probs: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``(P, G)`` cost from proposals ``points (P, 2)`` px, ``probs (P, G)`` and ``gt (G, 2)`` px."""
    return DIST_WEIGHT * torch.cdist(points.double(), gt.double()) - probs.double()


@MATCHERS.register("cheapest")
def cheapest(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per GT (column) its cheapest proposal (row). Returns ``(rows, cols)`` of length ``G``."""
    g = cost.shape[1]
    if g == 0 or cost.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return cost.argmin(0).long().cpu(), torch.arange(g, dtype=torch.long)


@MATCHERS.register("hungarian")
def hungarian(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal one-to-one assignment; ``min(P, G)`` pairs."""
    from scipy.optimize import linear_sum_assignment

    if cost.shape[0] == 0 or cost.shape[1] == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    r, c = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(r, dtype=torch.long), torch.as_tensor(c, dtype=torch.long)
