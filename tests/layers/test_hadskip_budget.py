"""The homotopic budget term drives the mean number of layers used to the budget on a toy task (seconds).

The budget constrains the *expected* number of layers (paper eq. 2), i.e. the mean of the sampled training gates.
The deterministic inference rule (keep iff P(keep) >= 0.5) can differ from it while gates are undecided
(e.g. four layers at P = 0.25 count 1 in expectation and 0 at inference); that number is printed, not asserted.
"""

import pytest
import torch
from test_hadskip import ToyHadSkipModel

from random_ltd.layers.hadskip import budget_penalty
from random_ltd.schedules import HomotopicBudget


@pytest.mark.parametrize("budget", [2, 5])
def test_budget_term_reaches_budget(budget):
    torch.manual_seed(0)
    L = 8
    model = ToyHadSkipModel(vocab=20, h=8, layers=L, classes=2)
    ids = torch.randint(0, 20, (64, 6))
    labels = (ids[:, 0] < 10).long()
    sched = HomotopicBudget(L, budget, steps_per_stage=15)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(15 * (L - budget) + 60):
        out = model(ids)
        penalty = budget_penalty(out.gates, sched.budget, beta=1.0)  # the paper's beta, gap in layers
        loss = torch.nn.functional.cross_entropy(out.logits, labels) + penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert sched.done
    with torch.no_grad():
        sampled = torch.stack([model(ids).gates.sum(1).mean() for _ in range(10)]).mean().item()
        decided = model.eval()(ids).gates.sum(1).mean().item()
    print(f"budget {budget}: sampled mean layers {sampled:.2f}, eval (deterministic) mean layers {decided:.2f}")
    assert abs(sampled - budget) <= 0.5
    assert 0 <= decided <= L
