"""The importance-weighted bound on log p(x) (Burda et al. 2015), for any combination of parts.

    log p(x) ≥ log (1/k) Σ_i p(x|z_i) p(z_i) / q(z_i|x),  z_i ~ q(z|x)

Only meaningful as a log-likelihood when the model's likelihood is normalized on the data
(`VAE.normalized`); evaluate reports it under another name otherwise.
"""

import math

import torch
from torch import Tensor

from vaeops.model.vae import VAE


@torch.no_grad()
def iwae_log_px(
    model: VAE, x: Tensor, k: int, chunk: int = 100, generator: torch.Generator | None = None
) -> Tensor:
    """Per image, shape (B,). Samples are drawn `chunk` at a time and combined with a running
    logsumexp, so memory is bounded by B × chunk decoded images whatever k is. Pass a seeded
    `generator` for repeatable estimates."""
    mu, logvar = model.encode(x)
    total = torch.full((x.shape[0],), -math.inf, dtype=torch.float32, device=x.device)
    done = 0
    while done < k:
        n = min(chunk, k - done)
        eps = torch.randn(n, *mu.shape, generator=generator, dtype=mu.dtype, device=x.device)
        z = mu + eps * torch.exp(0.5 * logvar)
        out = model.decoder(z.flatten(0, 1))
        recon, kl = model.terms(
            x, out.view(n, *x.shape[:1], *out.shape[1:]), mu, logvar, z, analytic_kl=False
        )
        total = torch.logaddexp(total, torch.logsumexp(-(recon + kl), dim=0))
        done += n
    return total - math.log(k)
