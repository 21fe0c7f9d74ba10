"""ELBO terms in nats per image, and the importance-weighted bound (Burda et al. 2015).

ELBO = E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)). With a Bernoulli decoder, −log p(x|z) is the BCE summed
over pixels (the article's `reduction='sum'`); targets may be continuous in [0, 1] as in the article.
"""

import math

import torch
from torch import Tensor
from torch.nn import functional as F


def recon_nll(logits: Tensor, x: Tensor) -> Tensor:
    """−log p(x|z) per image: BCE-with-logits summed over pixels. Shape (B,)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def kl_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """Analytic KL(N(mu, exp(logvar)) ‖ N(0, I)) per image, summed over latent dims. Shape (B,)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def elbo_terms(logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """(recon, kl) per image; the ELBO is −(recon + kl)."""
    return recon_nll(logits, x), kl_normal(mu, logvar)


@torch.no_grad()
def iwae_log_px(
    model: torch.nn.Module, x: Tensor, k: int, chunk: int = 100, generator: torch.Generator | None = None
) -> Tensor:
    """log p(x) ≥ log (1/k) Σ_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x); per image, shape (B,).

    Samples are drawn `chunk` at a time and combined with a running logsumexp, so memory is bounded
    by B × chunk decoded images whatever k is. Pass a seeded `generator` for repeatable estimates.
    """
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    target = x.flatten(1)
    # log p(z) − log q(z|x) with z = mu + std·eps: the 2π terms cancel, leaving this plus ½Σ(eps² − z²).
    half_logvar = 0.5 * logvar.sum(1)
    total = torch.full((x.shape[0],), -math.inf, dtype=mu.dtype, device=x.device)
    done = 0
    while done < k:
        n = min(chunk, k - done)
        eps = torch.randn(n, *mu.shape, generator=generator, dtype=mu.dtype, device=x.device)
        z = mu + eps * std  # n × B × D
        logits = model.decode_logits(z.flatten(0, 1)).view(n, x.shape[0], -1)
        # log p(x|z) = Σ x·l − softplus(l), with softplus(l) = relu(l) + log(1 + e^−|l|) computed in place:
        # the logits are by far the biggest tensor, and fresh allocations of that size cost more than
        # the math on CPU. Dropping log1p's precision costs < 1e-7 nats per pixel.
        log_px_z = torch.einsum("nbp,bp->nb", logits, target) - logits.clamp(min=0).sum(-1)
        log_px_z -= logits.abs_().neg_().exp_().add_(1).log_().sum(-1)
        log_w = log_px_z + 0.5 * (eps.pow(2) - z.pow(2)).sum(-1) + half_logvar
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        done += n
    return total - math.log(k)
