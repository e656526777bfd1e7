"""Binary-gate estimators vs the ``reinmax`` 0.1.0 package and the paper's Algorithm 1."""

import pytest
import torch
from reinmax import reinmax as reference_reinmax
from scipy.stats import chisquare

from random_ltd.layers.estimators import binary_gate, gumbel_straight_through, reinmax, straight_through


def _paper_algorithm_1(logits, sample, tau):
    """HadSkip appendix C (with the package's tau in pi1), written with autograd and stop_gradient = detach."""
    pi0 = logits.softmax(-1)
    pi1 = (sample + (logits / tau).softmax(-1)) / 2
    pi1 = (torch.log(pi1).detach() - logits.detach() + logits).softmax(-1)  # grad of softmax at pi1
    pi2 = 2 * pi1 - 0.5 * pi0
    return pi2 - pi2.detach() + sample


@pytest.mark.parametrize("shape", [(1, 2), (7, 2), (3, 5, 2), (4, 3)], ids=str)
@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_reinmax_matches_package_sample_and_gradient(shape, tau):
    torch.manual_seed(0)
    logits = (torch.randn(shape) * 2).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    g_sample, g_probs = torch.randn(shape), torch.randn(shape)

    torch.manual_seed(123)
    ref_sample, ref_probs = reference_reinmax(ref_logits, tau)
    torch.manual_seed(123)
    sample, probs = reinmax(logits, tau)
    assert torch.equal(sample, ref_sample)
    assert torch.equal(probs, ref_probs)

    ((ref_sample * g_sample).sum() + (ref_probs * g_probs).sum()).backward()
    ((sample * g_sample).sum() + (probs * g_probs).sum()).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-6, atol=1e-7)


def test_reinmax_gradient_matches_paper_algorithm():
    torch.manual_seed(1)
    logits = torch.randn(64, 2, requires_grad=True)
    paper_logits = logits.detach().clone().requires_grad_()
    g = torch.randn(64, 2)
    sample, _ = reinmax(logits, 1.0)
    (sample * g).sum().backward()
    (_paper_algorithm_1(paper_logits, sample.detach(), 1.0) * g).sum().backward()
    torch.testing.assert_close(logits.grad, paper_logits.grad, rtol=1e-5, atol=1e-6)


def test_reinmax_binary_distribution_chi_square():
    torch.manual_seed(2)
    p_keep = torch.tensor([0.05, 0.3, 0.5, 0.9])
    logits = torch.stack([torch.zeros(4), torch.log(p_keep / (1 - p_keep))], -1).expand(20000, 4, 2)
    for fn in (lambda x: reinmax(x, 1.0)[0], lambda x: straight_through(x)[0],
               lambda x: gumbel_straight_through(x, 0.5)[0]):
        keeps = fn(logits)[..., 1].sum(0)
        for k, p in zip(keeps.tolist(), p_keep.tolist()):
            assert chisquare([k, 20000 - k], [20000 * p, 20000 * (1 - p)]).pvalue > 1e-4


@pytest.mark.parametrize("estimator", ["reinmax", "ste", "gumbel"])
def test_binary_gate_exact_and_differentiable(estimator):
    torch.manual_seed(3)
    logits = torch.randn(33, 2, requires_grad=True)
    g = binary_gate(logits, estimator=estimator, tau=1.0)
    assert g.shape == (33,)
    assert set(g.unique().tolist()) <= {0.0, 1.0}
    (g * torch.arange(33.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_binary_gate_inference_rule_is_deterministic():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [-3.0, -2.9]])
    assert binary_gate(logits, training=False).tolist() == [1.0, 0.0, 1.0, 1.0]


def test_straight_through_gradient_is_softmax_jacobian():
    logits = torch.randn(5, 2, requires_grad=True)
    g = torch.randn(5, 2)
    sample, probs = straight_through(logits)
    (sample * g).sum().backward()
    p = probs.detach()
    expected = p * g - p * (p * g).sum(-1, keepdim=True)
    torch.testing.assert_close(logits.grad, expected)


def test_bad_inputs():
    with pytest.raises(ValueError, match="tau must be"):
        reinmax(torch.zeros(2, 2), 0.5)
    with pytest.raises(ValueError, match=r"\[..., 2\]"):
        binary_gate(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="estimator"):
        binary_gate(torch.zeros(2, 2), estimator="sigmoid")
    with pytest.raises(TypeError, match="floating"):
        reinmax(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="C >= 2"):
        reinmax(torch.zeros(3, 1))
