"""losses: the ELBO terms agree with torch.distributions and the article's formulation."""

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence
from torch.nn import functional as F

from vaeops.losses import elbo_terms, kl_normal, recon_nll


@pytest.mark.parametrize("latent_dim", [1, 20])
def test_analytic_kl_equals_torch_distributions(latent_dim):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(64, latent_dim, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(64, latent_dim, generator=g, dtype=torch.float64) * 2
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = kl_divergence(q, p).sum(-1)
    assert torch.allclose(kl_normal(mu, logvar), expected, rtol=1e-12, atol=1e-12)
    assert kl_normal(mu, logvar).shape == (64,) and (kl_normal(mu, logvar) >= 0).all()
    zero = torch.zeros(3, latent_dim)
    assert torch.equal(kl_normal(zero, zero), torch.zeros(3))


def test_recon_is_bernoulli_nll_summed_over_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 1, 5, 7, generator=g, dtype=torch.float64) * 3
    x = torch.bernoulli(torch.full_like(logits, 0.3), generator=g)
    expected = -Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(recon_nll(logits, x), expected, rtol=1e-12)


def test_recon_matches_the_articles_bce_on_continuous_targets():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 784, generator=g, dtype=torch.float64)
    x = torch.rand(8, 784, generator=g, dtype=torch.float64)
    article = torch.stack(
        [
            F.binary_cross_entropy(torch.sigmoid(lg), xi, reduction="sum")
            for lg, xi in zip(logits, x, strict=True)
        ]
    )
    assert torch.allclose(recon_nll(logits, x), article, rtol=1e-10)


def test_recon_stays_finite_and_exact_where_sigmoid_then_bce_saturates():
    logits = torch.tensor([[200.0, -200.0]])
    x = torch.tensor([[0.0, 1.0]])
    # −log σ(−200) = 200 for each pixel; sigmoid + BCE clamps its log at −100 instead.
    assert recon_nll(logits, x).item() == pytest.approx(400.0)
    assert F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum").item() == pytest.approx(200.0)


def test_elbo_terms_per_image():
    logits, x = torch.zeros(4, 1, 3, 3), torch.full((4, 1, 3, 3), 0.5)
    mu, logvar = torch.zeros(4, 2), torch.zeros(4, 2)
    recon, kl = elbo_terms(logits, x, mu, logvar)
    assert recon.shape == kl.shape == (4,)
    assert torch.allclose(recon, torch.full((4,), 9 * torch.log(torch.tensor(2.0)).item()))
    assert torch.equal(kl, torch.zeros(4))
