"""The importance-weighted bound on log p(x) (Burda et al. 2015), for any combination of parts.

    log p(x) ≥ log (1/k) Σ_i p(x|z_i) p(z_i) / q(z_i|x),  z_i ~ q(z|x)

Only meaningful as a log-likelihood when the model's likelihood is normalized on the data
(`VAE.normalized`); evaluate reports it under another name otherwise.

Nearly all the work is decoding k samples per image and scoring each decoded image, so on CPU the
samples are decoded a cache-sized step at a time. With `bf16` the decoder computes in bf16 (on CPUs
with AVX512-BF16 or AMX, and on GPUs, several times faster than fp32): the likelihood is then
evaluated in fp32 on what that decoder put out, and the logsumexp stays fp32, so the estimate is
still a proper bound, of a decoder that rounds its weights and activations to bf16.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from vaeops.model.archs import MLPDecoder
from vaeops.model.likelihoods import Bernoulli
from vaeops.model.priors import log_normal
from vaeops.model.vae import VAE

# Decodes per step on CPU: their outputs and the passes over them stay in cache.
STEP_ROWS = 2048
# Pixels whose σ(|l|) ∈ [½, 1) are multiplied before one log: a product of at most 16 stays ≥ 2^-16,
# far from float32's underflow.
LOG_GROUP = 16


@contextmanager
def bf16_products(enabled: bool) -> Iterator[None]:
    """oneDNN matmuls multiply fp32 tensors in bf16 and accumulate and return fp32 (CPU)."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    try:
        if enabled:
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


def bernoulli_mlp_nll(decoder: MLPDecoder, x: Tensor, z: Tensor, step: int, bf16: bool) -> Tensor:
    """−log p(x|z), n × B for z n × B × D, for a Bernoulli on an MLP decoder's logits l = W h + b.

    Per decoded image, with softplus(l) = max(l, 0) − log σ(|l|) and max(l, 0) = (l + |l|) / 2:

        Σ_p softplus(l_p) − x_p l_p  =  Σ_p (|l_p| / 2 − log σ(|l_p|))  +  h · Wᵀ(½ − x) + b · (½ − x)

    The last two terms are a dot product per decoded image instead of passes over its logits, and
    the logs are taken of products of σ(|l|) over LOG_GROUP pixels. With bf16, h and W are rounded
    to bf16 and their product accumulates in fp32: the logits stay fp32, and the dot products use
    the same rounded h and W, so the terms cancel as they do in fp32.
    """
    b = z.shape[1]
    weight, bias = decoder.fc_out.weight, decoder.fc_out.bias
    if bf16:
        weight = weight.bfloat16().float()
    half_minus_x = 0.5 - x.flatten(1)  # B × P
    per_image, offset = half_minus_x @ weight, half_minus_x @ bias  # B × H, B
    pixels = weight.shape[0]
    group = math.gcd(pixels, LOG_GROUP)
    logits = torch.empty(step * b, pixels, device=z.device)  # reused: no fresh pages every step
    nll = []
    for zs in z.split(step):
        h = decoder.features(zs.flatten(0, 1))
        if bf16:
            h = h.bfloat16().float()
        with bf16_products(bf16):
            a = torch.mm(h, weight.T, out=logits[: len(h)])
        a = a.add_(bias).abs_()  # the bias in place: addmm would first copy it into every row
        half_abs = a.sum(1) / 2
        log_sig = a.sigmoid_().view(-1, group, pixels // group).prod(1).log_().sum(1)
        dot = torch.linalg.vecdot(h.view(len(zs), b, -1), per_image)
        nll.append((half_abs - log_sig).view(len(zs), b) + dot + offset)
    return torch.cat(nll)


def reconstruction_nll(model: VAE, x: Tensor, z: Tensor, bf16: bool) -> Tensor:
    """−log p(x|z), n × B for z n × B × D, decoded `STEP_ROWS` at a time on CPU."""
    n, b = z.shape[:2]
    step = max(1, STEP_ROWS // b) if z.device.type == "cpu" else n
    if isinstance(model.decoder, MLPDecoder) and isinstance(model.likelihood, Bernoulli):
        return bernoulli_mlp_nll(model.decoder, x, z, step, bf16)
    nll = []
    for zs in z.split(step):
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.decoder(zs.flatten(0, 1))
        nll.append(model.likelihood.nll(out.view(*zs.shape[:2], *out.shape[1:]).float(), x))
    return torch.cat(nll)


@torch.no_grad()
def iwae_log_px(
    model: VAE,
    x: Tensor,
    k: int,
    chunk: int = 100,
    generator: torch.Generator | None = None,
    bf16: bool = False,
) -> Tensor:
    """Per image, shape (B,). Samples are drawn `chunk` at a time and combined with a running
    logsumexp, so memory is bounded by B × chunk samples (decoded all at once on a GPU, STEP_ROWS at
    a time on CPU) whatever k is. Pass a seeded `generator` for repeatable estimates; `bf16` for a
    bf16 decoder (see above)."""
    mu, logvar = model.encode(x)
    total = torch.full((x.shape[0],), -math.inf, dtype=torch.float32, device=x.device)
    done = 0
    while done < k:
        n = min(chunk, k - done)
        eps = torch.randn(n, *mu.shape, generator=generator, dtype=mu.dtype, device=x.device)
        z = mu + eps * torch.exp(0.5 * logvar)
        recon = reconstruction_nll(model, x, z, bf16)
        kl = log_normal(z, mu, logvar) - model.prior.log_prob(z, model.encode_pseudo)
        total = torch.logaddexp(total, torch.logsumexp(-(recon + kl), dim=0))
        done += n
    return total - math.log(k)
