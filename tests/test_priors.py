"""priors: log-densities agree with torch.distributions, the KL terms with their closed forms."""

import pytest
import torch
from conftest import tiny_vae
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal, kl_divergence

from vaeops.model.priors import PRIORS, NormalPrior, VampPrior, log_mixture, log_normal


def diag_normal(mu: torch.Tensor, logvar: torch.Tensor) -> Independent:
    return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)


@pytest.mark.parametrize("latent_dim", [1, 20])
def test_normal_prior_kl_is_torch_distributions_closed_form(latent_dim):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(64, latent_dim, generator=g, dtype=torch.float64) * 2
    logvar = torch.randn(64, latent_dim, generator=g, dtype=torch.float64) * 2
    prior = NormalPrior(latent_dim, (1, 4, 4), 1).double()
    expected = kl_divergence(diag_normal(mu, logvar), diag_normal(torch.zeros_like(mu), torch.zeros_like(mu)))
    kl = prior.kl(mu, logvar, None, None)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)
    assert kl.shape == (64,) and (kl >= 0).all()
    zero = torch.zeros(3, latent_dim, dtype=torch.float64)
    assert torch.equal(prior.kl(zero, zero, None, None), torch.zeros(3, dtype=torch.float64))


def test_log_normal_and_log_mixture_are_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g).double()
    z = torch.randn(5, 7, 4, generator=g, dtype=torch.float64) * 2  # leading dims: samples × images
    torch.testing.assert_close(log_normal(z, mu[0], logvar[0]), diag_normal(mu[0], logvar[0]).log_prob(z))
    mixture = MixtureSameFamily(
        Categorical(logits=torch.zeros(3, dtype=torch.float64)), diag_normal(mu, logvar)
    )
    got = log_mixture(z, mu, logvar)
    assert got.shape == (5, 7)
    torch.testing.assert_close(got, mixture.log_prob(z), rtol=1e-10, atol=1e-10)


def test_normal_prior_is_one_zero_component_and_samples_n_0_i():
    prior = NormalPrior(3, (1, 4, 4), 500)
    mu, logvar = prior.components(None)
    assert torch.equal(mu, torch.zeros(1, 3)) and torch.equal(logvar, torch.zeros(1, 3))
    assert prior.state_dict() == {}  # nothing to save: N(0, I) has no parameters
    z = torch.randn(4, 3)
    torch.testing.assert_close(prior.log_prob(z, None), log_normal(z, mu, logvar))
    a = prior.sample(20_000, None, torch.Generator().manual_seed(0))
    b = prior.sample(20_000, None, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (20_000, 3)
    torch.testing.assert_close(a.mean(0), torch.zeros(3), atol=0.05, rtol=0)
    torch.testing.assert_close(a.var(0), torch.ones(3), atol=0.05, rtol=0)


def test_monte_carlo_kl_of_the_normal_prior_matches_its_closed_form():
    g = torch.Generator().manual_seed(2)
    prior = NormalPrior(3, (1, 4, 4), 1).double()
    mu, logvar = torch.randn(1, 3, generator=g).double(), torch.randn(1, 3, generator=g).double()
    z = mu + torch.randn(200_000, 1, 3, generator=g, dtype=torch.float64) * torch.exp(0.5 * logvar)
    mc = log_normal(z, mu, logvar) - prior.log_prob(z, None)
    closed = prior.kl(mu, logvar, None, None)
    assert abs(mc.mean() - closed).item() < 4 * mc.std().item() / len(z) ** 0.5


@pytest.mark.parametrize("arch", ["mlp", "conv", "resnet"])
def test_vamp_kl_by_monte_carlo_matches_the_closed_form_with_one_component(arch):
    """With one pseudo-input the VampPrior is the Gaussian q(z | u): its KL has a closed form."""
    model = tiny_vae(arch, (1, 13, 15), 3, prior="vamp", prior_components=1)
    prior = model.prior
    assert isinstance(prior, VampPrior) and prior.pseudo_logits.shape == (1, 1, 13, 15)
    with torch.no_grad():
        mu_p, logvar_p = (t.double() for t in prior.components(model.encode))
        assert mu_p.shape == logvar_p.shape == (1, 3)
        # q(z|u) for the pseudo-image itself: the encoder's own Gaussian.
        torch.testing.assert_close(mu_p, model.encode(torch.sigmoid(prior.pseudo_logits))[0].double())
        g = torch.Generator().manual_seed(3)
        mu = mu_p + torch.randn(1, 3, generator=g, dtype=torch.float64)
        logvar = logvar_p + torch.randn(1, 3, generator=g, dtype=torch.float64)
        z = mu + torch.randn(200_000, 1, 3, generator=g, dtype=torch.float64) * torch.exp(0.5 * logvar)
        mc = prior.kl(mu.float(), logvar.float(), z.float(), model.encode).double()
    closed = kl_divergence(diag_normal(mu, logvar), diag_normal(mu_p, logvar_p))
    assert mc.shape == (200_000, 1)
    assert abs(mc.mean() - closed).item() < 4 * mc.std().item() / len(z) ** 0.5
    # And the prior's log-density is that Gaussian's.
    torch.testing.assert_close(
        prior.log_prob(z[:10].float(), model.encode).double(),
        diag_normal(mu_p, logvar_p).log_prob(z[:10]),
        rtol=1e-5,
        atol=1e-4,
    )


def test_vamp_samples_from_its_mixture():
    model = tiny_vae("mlp", (1, 6, 5), 2, prior="vamp", prior_components=3)
    with torch.no_grad():
        mu, logvar = model.prior.components(model.encode)
        a = model.prior.sample(30_000, model.encode, torch.Generator().manual_seed(0))
        b = model.prior.sample(30_000, model.encode, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (30_000, 2)
    # The mixture's mean and variance (equal weights).
    mean = mu.mean(0)
    var = (logvar.exp() + mu.pow(2)).mean(0) - mean.pow(2)
    torch.testing.assert_close(a.mean(0), mean, atol=4 * (var / len(a)).sqrt().max().item(), rtol=0)
    torch.testing.assert_close(a.var(0), var, atol=0.05 * var.max().item(), rtol=0)


def test_every_prior_has_components_log_prob_kl_and_sample():
    for name, cls in PRIORS.items():
        model = tiny_vae("mlp", (1, 5, 4), 3, prior=name, prior_components=2)
        assert isinstance(model.prior, cls)
        with torch.no_grad():
            mu, logvar = model.prior.components(model.encode)
            z = model.prior.sample(6, model.encode, torch.Generator().manual_seed(0))
            torch.testing.assert_close(model.prior.log_prob(z, model.encode), log_mixture(z, mu, logvar))
            q_mu, q_logvar = torch.randn(6, 3), torch.randn(6, 3)
            assert model.prior.kl(q_mu, q_logvar, z, model.encode).shape == (6,)
        assert torch.isfinite(model.prior.log_prob(z, model.encode)).all(), name
