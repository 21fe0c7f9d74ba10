"""Likelihoods p(x|z) over images with pixels in [0, 1], chosen by `train.likelihood`.

The decoder outputs `params_per_channel` maps per image channel; a likelihood turns them into
−log p(x|z) per image (summed over pixels), a mean image in [0, 1] for pictures and export, and says
whether it is a normalized distribution of the data, i.e. whether log p(x) and bits/dim exist.
`out` may carry extra leading dims (IWAE samples) that broadcast against `x` (B×C×H×W).
"""

import math

import torch
from torch import Tensor
from torch.nn import functional as F


class Likelihood:
    params_per_channel = 1

    def __init__(self, channels: int) -> None:
        self.channels = channels

    @classmethod
    def from_config(cls, channels: int, config: dict) -> "Likelihood":
        """Built from the model config: a likelihood with params of its own reads them here."""
        return cls(channels)

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, out: Tensor) -> Tensor:
        raise NotImplementedError

    def normalized(self, binary_targets: bool) -> bool:
        raise NotImplementedError


class Bernoulli(Likelihood):
    """The article's BCE. A distribution over {0, 1} pixels only: on grey targets it is a loss, not a
    likelihood (it does not sum to 1 over [0, 1]), so evaluate reports it as BCE there."""

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        out, x = torch.broadcast_tensors(out, x)  # views: IWAE samples share x without copying it
        return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum((-3, -2, -1))

    def mean(self, out: Tensor) -> Tensor:
        return torch.sigmoid(out)

    def normalized(self, binary_targets: bool) -> bool:
        return binary_targets


def _log_cb_norm(logits: Tensor) -> Tensor:
    """log C(λ) of the continuous Bernoulli with λ = sigmoid(l): C = l / tanh(l / 2), 2 at l = 0."""
    a = logits.abs()
    small = a < 1e-2
    a_safe = torch.where(small, torch.ones_like(a), a)
    exact = torch.log(a_safe) - torch.log(torch.tanh(a_safe / 2))
    return torch.where(small, math.log(2.0) + a * a / 12, exact)  # Taylor: C ≈ 2 (1 + l²/12)


class ContinuousBernoulli(Likelihood):
    """Loaiza-Ganem & Cunningham 2019: the Bernoulli's kernel normalized over x in [0, 1], so grey
    pixels get a true density. Its mean is not λ: see `mean`."""

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        return (F.softplus(out) - x * out - _log_cb_norm(out)).sum((-3, -2, -1))

    def mean(self, out: Tensor) -> Tensor:
        # E[x] = λ / (2λ − 1) + 1 / (2 artanh(1 − 2λ)) = σ(l) / tanh(l/2) − 1/l, → 1/2 + l/12 near 0.
        # The two terms cancel for small |l|: in float32 that loses most digits below |l| ≈ 0.5, so
        # the series (1/2 + l/12 − l³/720) takes over there.
        small = out.abs() < 0.5
        safe = torch.where(small, torch.ones_like(out), out)
        exact = torch.sigmoid(safe) / torch.tanh(safe / 2) - 1 / safe
        return torch.where(small, 0.5 + out / 12 - out.pow(3) / 720, exact).clamp(0, 1)

    def normalized(self, binary_targets: bool) -> bool:
        return True


class DiscretizedLogistic(Likelihood):
    """A mixture of K logistics per channel, discretized to the 256 levels of an 8-bit pixel
    (Salimans et al. 2017, PixelCNN++, without the channel coupling): a normalized distribution of
    8-bit images, so its bits/dim compare with the literature. Channels are independent given z."""

    def __init__(self, channels: int, components: int = 1) -> None:
        super().__init__(channels)
        self.k = components
        self.params_per_channel = 3 * components  # mixture logits, means, log-scales

    @classmethod
    def from_config(cls, channels: int, config: dict) -> "Likelihood":
        return cls(channels, config["logistic_components"])

    def _split(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        *lead, _, h, w = out.shape
        out = out.reshape(*lead, self.channels, 3, self.k, h, w)
        return out[..., 0, :, :, :], torch.tanh(out[..., 1, :, :, :]), out[..., 2, :, :, :].clamp(min=-7.0)

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        logit_w, means, log_s = self._split(out)
        x = (2 * x - 1).unsqueeze(-3)  # levels k/255 → [−1, 1], against each component
        centered, inv_s = x - means, torch.exp(-log_s)
        plus, minus = inv_s * (centered + 1 / 255), inv_s * (centered - 1 / 255)
        log_cdf_plus = plus - F.softplus(plus)  # log σ(plus): the bottom level takes the left tail
        log_1m_cdf_minus = -F.softplus(minus)  # log (1 − σ(minus)): the top level takes the right tail
        delta = torch.sigmoid(plus) - torch.sigmoid(minus)
        mid = inv_s * centered
        # Where the bin mass underflows, the density at its centre times the bin width.
        log_pdf_mid = mid - log_s - 2 * F.softplus(mid) - math.log(127.5)
        inner = torch.where(delta > 1e-5, torch.log(delta.clamp(min=1e-12)), log_pdf_mid)
        log_p = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_1m_cdf_minus, inner))
        log_p = torch.logsumexp(log_p + F.log_softmax(logit_w, dim=-3), dim=-3)
        return -log_p.sum((-3, -2, -1))

    def mean(self, out: Tensor) -> Tensor:
        """The mixture of the components' locations: the mean of the logistics before
        discretization, which for the sharp components a trained model has is the pixels' mean."""
        logit_w, means, _ = self._split(out)
        return ((torch.softmax(logit_w, dim=-3) * means).sum(-3) + 1).div(2).clamp(0, 1)

    def normalized(self, binary_targets: bool) -> bool:
        return True


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": Bernoulli,
    "continuous_bernoulli": ContinuousBernoulli,
    "logistic": DiscretizedLogistic,
}
