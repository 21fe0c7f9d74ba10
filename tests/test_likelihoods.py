"""likelihoods: each p(x|z) is a normalized distribution where it claims to be, checked numerically,
and its mean image is the distribution's mean."""

import math

import pytest
import torch
from torch.distributions import Bernoulli
from torch.nn import functional as F

from vaeops.model.likelihoods import LIKELIHOODS, ContinuousBernoulli, DiscretizedLogistic

# Logits on both sides of the continuous Bernoulli's Taylor branch (|l| < 1e-2) and far into saturation.
CB_LOGITS = [-30.0, -5.0, -0.5, -0.0101, -0.0099, -1e-3, 0.0, 1e-3, 0.0099, 0.0101, 0.5, 5.0, 30.0]
LEVELS = torch.arange(256, dtype=torch.float64).div(255)  # the 256 values of an 8-bit pixel


def simpson(y: torch.Tensor, h: float) -> torch.Tensor:
    """∫ over an odd number of equally spaced points along the last dim (Simpson's rule)."""
    return (y[..., 0] + y[..., -1] + 4 * y[..., 1:-1:2].sum(-1) + 2 * y[..., 2:-1:2].sum(-1)) * h / 3


def cb_density(logits: list[float], n: int = 20_001) -> tuple[torch.Tensor, torch.Tensor]:
    """(x grid over [0, 1], p(x) for each logit: L × n) of one-pixel images, float64."""
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    out = torch.tensor(logits, dtype=torch.float64).view(-1, 1, 1, 1, 1)  # L leading "samples"
    nll = ContinuousBernoulli(1).nll(out, x.view(-1, 1, 1, 1))  # broadcasts to L × n
    assert nll.shape == (len(logits), n)
    return x, torch.exp(-nll)


def test_continuous_bernoulli_density_integrates_to_1_over_0_1():
    x, p = cb_density(CB_LOGITS)
    total = simpson(p, 1 / (len(x) - 1))
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-9)
    assert ContinuousBernoulli(1).normalized(binary_targets=False)


def test_continuous_bernoulli_mean_is_the_numerical_mean_not_lambda():
    x, p = cb_density(CB_LOGITS)
    numerical = simpson(x * p, 1 / (len(x) - 1))
    logits = torch.tensor(CB_LOGITS, dtype=torch.float64).view(-1, 1, 1, 1)
    mean = ContinuousBernoulli(1).mean(logits).view(-1)
    # 1e-8: near 0 the mean is its Taylor polynomial 1/2 + l/12, whose next term is l³/720.
    torch.testing.assert_close(mean, numerical, rtol=0, atol=1e-8)
    # In float32, as the model computes it, cancellation near the Taylor branch stays small.
    mean32 = ContinuousBernoulli(1).mean(logits.float()).view(-1).double()
    torch.testing.assert_close(mean32, numerical, rtol=0, atol=1e-4)
    # Its mean is not the Bernoulli's λ = sigmoid(l): e.g. l = 5 gives ~0.81, not ~0.99.
    assert (torch.sigmoid(logits.view(-1)) - mean).abs().max() > 0.1


def random_logistic_params(k: int, g: torch.Generator, channels: int = 1) -> torch.Tensor:
    """Decoder output for one pixel: per channel, K mixture logits, K means, K log-scales (−9 to 3,
    past the clamp at −7 and wide enough to spill over both edges)."""
    out = torch.randn(channels, 3, k, generator=g, dtype=torch.float64) * 2
    out[:, 2] = torch.rand(channels, k, generator=g, dtype=torch.float64) * 12 - 9
    return out.reshape(1, channels * 3 * k, 1, 1)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_discretized_logistic_sums_to_1_over_the_256_levels(k):
    g = torch.Generator().manual_seed(k)
    lik = DiscretizedLogistic(1, k)
    assert lik.params_per_channel == 3 * k
    for _ in range(50):
        out = random_logistic_params(k, g)
        for dtype in (torch.float64, torch.float32):
            p = torch.exp(-lik.nll(out.to(dtype), LEVELS.to(dtype).view(256, 1, 1, 1)))
            assert p.shape == (256,)
            # Bins whose mass underflows use the density at their centre: a tiny shortfall.
            assert p.double().sum().item() == pytest.approx(1.0, abs=2e-5)
    assert lik.normalized(binary_targets=False)


def logistic_at(level: int, channels: int = 1, k: int = 1) -> torch.Tensor:
    """Decoder output whose every component sits on `level` (of 0..255) with the smallest scale."""
    centre = 2 * level / 255 - 1
    raw_mean = math.atanh(max(-1 + 1e-12, min(1 - 1e-12, centre)))
    out = torch.zeros(channels, 3, k, dtype=torch.float64)
    out[:, 1], out[:, 2] = raw_mean, -20.0  # log-scale clamped to −7 inside
    return out.reshape(1, channels * 3 * k, 1, 1)


@pytest.mark.parametrize("level", [0, 1, 100, 254, 255])
def test_logistic_with_tiny_scale_puts_nearly_all_mass_on_its_level(level):
    lik = DiscretizedLogistic(1, 2)
    p = torch.exp(-lik.nll(logistic_at(level, k=2).expand(256, -1, -1, -1), LEVELS.view(256, 1, 1, 1)))
    assert p.argmax().item() == level
    assert p[level].item() > 0.95
    assert lik.mean(logistic_at(level, k=2)).item() == pytest.approx(level / 255, abs=1e-6)


def test_logistic_channels_are_independent_and_laid_out_channel_major():
    g = torch.Generator().manual_seed(0)
    k = 2
    lik3, lik1 = DiscretizedLogistic(3, k), DiscretizedLogistic(1, k)
    out = random_logistic_params(k, g, channels=3).expand(5, -1, 2, 3)
    x = torch.randint(0, 256, (5, 3, 2, 3), generator=g).double() / 255
    per_channel = sum(lik1.nll(out[:, 3 * k * c : 3 * k * (c + 1)], x[:, c : c + 1]) for c in range(3))
    torch.testing.assert_close(lik3.nll(out, x), per_channel)
    mean = lik3.mean(out)
    assert mean.shape == x.shape and 0 <= mean.min() and mean.max() <= 1
    for c in range(3):
        torch.testing.assert_close(mean[:, c : c + 1], lik1.mean(out[:, 3 * k * c : 3 * k * (c + 1)]))


def test_logistic_mixture_mean_weighs_its_components():
    centres = [math.atanh(2 * level / 255 - 1) for level in (51, 204)]
    # Per channel: K mixture logits, then K means, then K log-scales (weights 1/4 and 3/4).
    out = torch.tensor([0.0, math.log(3), *centres, -20.0, -20.0], dtype=torch.float64).view(1, 6, 1, 1)
    assert DiscretizedLogistic(1, 2).mean(out).item() == pytest.approx((51 + 3 * 204) / 4 / 255, abs=1e-6)


def test_bernoulli_is_torch_distributions_on_binary_targets():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 2, 5, 7, generator=g, dtype=torch.float64) * 3
    x = torch.bernoulli(torch.full_like(logits, 0.3), generator=g)
    expected = -Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(LIKELIHOODS["bernoulli"](2).nll(logits, x), expected, rtol=1e-12, atol=0)
    # Summed over {0, 1} per pixel: a distribution on binary images only.
    one = torch.zeros(1, 1, 1, 1, dtype=torch.float64) + 0.7
    both = LIKELIHOODS["bernoulli"](1).nll(
        one, torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    )
    assert torch.exp(-both).sum().item() == pytest.approx(1.0, abs=1e-12)
    assert LIKELIHOODS["bernoulli"](1).normalized(True) and not LIKELIHOODS["bernoulli"](1).normalized(False)


def test_bernoulli_is_the_articles_bce_on_grey_targets_and_broadcasts_over_samples():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 8, 1, 28, 28, generator=g, dtype=torch.float64)  # 3 samples of z per image
    x = torch.rand(8, 1, 28, 28, generator=g, dtype=torch.float64)
    article = torch.stack(
        [
            torch.stack(
                [
                    F.binary_cross_entropy(torch.sigmoid(lg), xi, reduction="sum")
                    for lg, xi in zip(s, x, strict=True)
                ]
            )
            for s in logits
        ]
    )
    torch.testing.assert_close(LIKELIHOODS["bernoulli"](1).nll(logits, x), article, rtol=1e-10, atol=0)


def test_bernoulli_stays_exact_where_sigmoid_then_bce_saturates():
    logits = torch.tensor([200.0, -200.0]).view(1, 1, 1, 2)
    x = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    # −log σ(−200) = 200 for each pixel; sigmoid + BCE clamps its log at −100 instead.
    assert LIKELIHOODS["bernoulli"](1).nll(logits, x).item() == pytest.approx(400.0)
    assert F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum").item() == pytest.approx(200.0)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_every_likelihood_has_a_mean_image_in_0_1_and_finite_nll_at_extremes(name):
    cls = LIKELIHOODS[name]
    lik = cls(3, 2) if cls is DiscretizedLogistic else cls(3)
    g = torch.Generator().manual_seed(3)
    out = torch.randn(2, 4, 3 * lik.params_per_channel, 5, 6, generator=g) * 50  # saturating params
    x = torch.randint(0, 256, (4, 3, 5, 6), generator=g).float() / 255
    x[:, :, 0] = 0.0
    x[:, :, 1] = 1.0
    if name == "bernoulli":
        x = x.round()
    nll = lik.nll(out, x)
    assert nll.shape == (2, 4) and torch.isfinite(nll).all()
    mean = lik.mean(out[0])
    assert mean.shape == x.shape and 0 <= mean.min() and mean.max() <= 1
