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


def _log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


@torch.no_grad()
def iwae_log_px(model: torch.nn.Module, x: Tensor, k: int, chunk: int = 100) -> Tensor:
    """log p(x) ≥ log (1/k) Σ_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x); per image, shape (B,).

    Samples are drawn `chunk` at a time and combined with a running logsumexp, so memory is bounded
    by B × chunk decoded images whatever k is.
    """
    mu, logvar = model.encode(x)
    total = torch.full((x.shape[0],), -math.inf, device=x.device)
    done = 0
    while done < k:
        n = min(chunk, k - done)
        eps = torch.randn(n, *mu.shape, device=x.device)
        z = mu + eps * torch.exp(0.5 * logvar)  # n × B × D
        logits = model.decode_logits(z.flatten(0, 1))
        target = x.unsqueeze(0).expand(n, *x.shape).flatten(0, 1)
        log_px_z = -recon_nll(logits, target).view(n, -1)
        log_pz = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        log_qz = _log_normal(z, mu, logvar)
        total = torch.logaddexp(total, torch.logsumexp(log_px_z + log_pz - log_qz, dim=0))
        done += n
    return total - math.log(k)
