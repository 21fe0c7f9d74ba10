"""The VAE assembled from parts: encoder and decoder (archs), likelihood p(x|z), prior p(z).

    ELBO(x) = E_q(z|x)[log p(x|z)] − KL(q(z|x) ‖ p(z))                   (train.objective: elbo)
    IWAE_k(x) = E[log (1/k) Σ_i p(x|z_i) p(z_i) / q(z_i|x)],  z_i ~ q(z|x)  (train.objective: iwae)

Everything is in nats per image. `model_config` is the plain dict the checkpoint stores, and
`build_model(config)` rebuilds any combination of parts from it.
"""

import math
from typing import Any

import torch
from torch import Tensor, nn

from vaeops.model.archs import ARCHS
from vaeops.model.likelihoods import LIKELIHOODS
from vaeops.model.priors import PRIORS, log_normal

# The keys build_model reads; the checkpoint stores them all (plus dataset and binarize).
MODEL_KEYS = (
    "arch",
    "image_shape",
    "latent_dim",
    "hidden_dim",
    "hidden_layers",
    "channels",
    "likelihood",
    "logistic_components",
    "prior",
    "prior_components",
)


class VAE(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        shape = tuple(config["image_shape"])
        self.image_shape, self.latent_dim = shape, config["latent_dim"]
        self.likelihood = LIKELIHOODS[config["likelihood"]].from_config(shape[0], config)
        out_channels = shape[0] * self.likelihood.params_per_channel
        self.encoder, self.decoder = ARCHS[config["arch"]](shape, self.latent_dim, out_channels, config)
        self.prior = PRIORS[config["prior"]](self.latent_dim, shape, config["prior_components"])

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(x)

    def encode_pseudo(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Encode a prior's pseudo-inputs (VampPrior). BatchNorm runs in eval mode here: the
        pseudo-inputs must neither skew the data's running statistics nor be a batch of their own
        (a single pseudo-input cannot be batch-normalized)."""
        norms = [m for m in self.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        modes = [m.training for m in norms]
        for m in norms:
            m.eval()
        try:
            return self.encoder(u)
        finally:
            for m, mode in zip(norms, modes, strict=True):
                m.train(mode)

    def decode(self, z: Tensor) -> Tensor:
        """The likelihood's mean image in [0, 1]: what pictures, export and the sampler show."""
        return self.likelihood.mean(self.decoder(z).float())

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(decoder output, mu, logvar, z) for noise eps of shape (n, B, D): n samples of z per image.
        The loss is computed outside (`terms`), in fp32 even when this runs under bf16 autocast."""
        mu, logvar = self.encode(x)
        z = mu + eps * torch.exp(0.5 * logvar)
        out = self.decoder(z.flatten(0, 1))
        return out.view(*z.shape[:2], *out.shape[1:]), mu, logvar, z

    def terms(
        self, x: Tensor, out: Tensor, mu: Tensor, logvar: Tensor, z: Tensor, analytic_kl: bool = True
    ) -> tuple[Tensor, Tensor]:
        """(recon, kl), each n × B: recon = −log p(x|z), kl = log q(z|x) − log p(z) for each sample,
        or the analytic KL where the prior has one and `analytic_kl` (the ELBO's lower-variance form)."""
        recon = self.likelihood.nll(out.float(), x)
        mu, logvar, z = mu.float(), logvar.float(), z.float()
        if analytic_kl and self.prior.analytic_kl:
            kl = self.prior.kl(mu, logvar, z, self.encode_pseudo).expand_as(recon)
        else:
            kl = log_normal(z, mu, logvar) - self.prior.log_prob(z, self.encode_pseudo)
        return recon, kl

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.decode(self.prior.sample(n, self.encode_pseudo, generator))

    def normalized(self, binary_targets: bool) -> bool:
        """Whether −recon is a log-likelihood of the data, so that log p(x) and bits/dim exist."""
        return self.likelihood.normalized(binary_targets)


def objective(recon: Tensor, kl: Tensor, name: str, beta: float = 1.0) -> Tensor:
    """Loss per image (B,) from n × B terms: −ELBO with KL weight beta, or −IWAE_n."""
    if name == "iwae":
        return -(torch.logsumexp(-(recon + kl), dim=0) - math.log(recon.shape[0]))
    return (recon + beta * kl).mean(0)


def model_config(params: Any, image_shape: tuple[int, int, int] | list[int], dataset: str) -> dict[str, Any]:
    """The checkpoint's model config from train params (a TrainParams or anything with its fields)."""
    config = {key: getattr(params, key) for key in MODEL_KEYS if key != "image_shape"}
    config["channels"] = list(config["channels"])
    # Binarization makes targets for a Bernoulli; the other likelihoods model the 8-bit pixels as they are.
    binarize = params.binarize and params.likelihood == "bernoulli"
    return {**config, "image_shape": list(image_shape), "dataset": dataset, "binarize": binarize}


def build_model(config: dict[str, Any]) -> VAE:
    return VAE(config)
