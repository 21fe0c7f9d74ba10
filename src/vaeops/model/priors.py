"""Priors p(z), chosen by `train.prior`: sampling, log-density and the KL term of the ELBO.

Every prior here is a mixture of diagonal Gaussians (one component for N(0, I)), which is also how
export hands it to the torch-free sampler: `components` gives their means and log-variances.
A prior that depends on the encoder (the VampPrior) gets it as `encode`.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

Encode = Callable[[Tensor], tuple[Tensor, Tensor]]
LOG_2PI = math.log(2 * math.pi)


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dim."""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def log_mixture(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log (1/K) Σ_k N(z; mu_k, var_k) for z (..., D) and K×D components, without a (..., K, D) tensor:
    the squared distance expands into two GEMMs, so IWAE chunks stay within memory."""
    mu, logvar = mu.to(z.dtype), logvar.to(z.dtype)
    inv_var = torch.exp(-logvar)  # K × D
    flat = z.reshape(-1, z.shape[-1])
    quad = flat.pow(2) @ inv_var.T - 2 * flat @ (mu * inv_var).T + (mu.pow(2) * inv_var).sum(1)
    log_k = -0.5 * (quad + logvar.sum(1) + z.shape[-1] * LOG_2PI)  # N × K
    return (torch.logsumexp(log_k, dim=1) - math.log(mu.shape[0])).view(z.shape[:-1])


class NormalPrior(nn.Module):
    """N(0, I), the article's prior; its KL to q(z|x) is analytic."""

    analytic_kl = True  # `kl` is exact; the others estimate it from the sample z

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], components: int) -> None:
        super().__init__()
        # Not saved: it only tells which device and dtype the prior lives on.
        self.register_buffer("origin", torch.zeros(1, latent_dim), persistent=False)

    def components(self, encode: Encode) -> tuple[Tensor, Tensor]:
        return self.origin, self.origin

    def log_prob(self, z: Tensor, encode: Encode) -> Tensor:
        return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)

    def kl(self, mu: Tensor, logvar: Tensor, z: Tensor, encode: Encode) -> Tensor:
        return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)

    def sample(self, n: int, encode: Encode, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.origin.shape[1], generator=generator, device=self.origin.device)


class VampPrior(nn.Module):
    """Tomczak & Welling 2018: p(z) = (1/K) Σ_k q(z | u_k), K learned pseudo-images u_k. The KL has no
    closed form, so the ELBO uses its one-sample Monte Carlo estimate log q(z|x) − log p(z)."""

    analytic_kl = False

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], components: int) -> None:
        super().__init__()
        # Pixel logits: sigmoid keeps the pseudo-images in [0, 1]; a small spread starts them mid-grey.
        self.pseudo_logits = nn.Parameter(0.1 * torch.randn(components, *image_shape))

    def components(self, encode: Encode) -> tuple[Tensor, Tensor]:
        return encode(torch.sigmoid(self.pseudo_logits))

    def log_prob(self, z: Tensor, encode: Encode) -> Tensor:
        return log_mixture(z, *self.components(encode))

    def kl(self, mu: Tensor, logvar: Tensor, z: Tensor, encode: Encode) -> Tensor:
        return log_normal(z, mu, logvar) - self.log_prob(z, encode)

    def sample(self, n: int, encode: Encode, generator: torch.Generator | None = None) -> Tensor:
        mu, logvar = self.components(encode)
        k = torch.randint(len(mu), (n,), generator=generator, device=mu.device)
        eps = torch.randn(n, mu.shape[1], generator=generator, device=mu.device)
        return mu[k] + eps * torch.exp(0.5 * logvar[k])


PRIORS: dict[str, type[nn.Module]] = {"normal": NormalPrior, "vamp": VampPrior}
