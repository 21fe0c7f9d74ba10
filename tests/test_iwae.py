"""The IWAE's fast paths against the plain computation: the Bernoulli on an mlp without passes over
x·l, decoding in cache-sized steps, and a bf16 decoder (which must stay a bound on a real model)."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_vae
from torch.nn import functional as F

from vaeops.config import EvaluateParams
from vaeops.device import native_bf16
from vaeops.evaluation import iwae
from vaeops.stages import evaluate

CPU = torch.device("cpu")


def plain_nll(model: torch.nn.Module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """−log p(x|z), n × B: all of z decoded at once, the likelihood's own nll."""
    out = model.decoder(z.flatten(0, 1))
    return model.likelihood.nll(out.view(*z.shape[:2], *out.shape[1:]), x)


def exact_log_px(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """log ∫ p(x|z) p(z) dz for a 1-D latent, by a Riemann sum on a fine grid over [-10, 10]."""
    z = torch.linspace(-10, 10, 40_001)[:, None]
    log_px_z = -model.likelihood.nll(model.decoder(z)[:, None], x)  # grid × images
    log_pz = model.prior.log_prob(z, model.encode)
    return torch.logsumexp(log_px_z + log_pz[:, None], 0) + math.log(float(z[1] - z[0]))


def sharp_mlp(shape: tuple[int, int, int], **parts: object) -> torch.nn.Module:
    """A tiny mlp with logits of tens, as a trained one has: σ(|l|) near 1, products near 2^-16."""
    model = tiny_vae("mlp", shape, 4, **parts)
    with torch.no_grad():
        model.decoder.fc_out.weight.mul_(8)
    return model


# 144 pixels, 25 (no factor of 16: a log per pixel), 192 in three channels.
@pytest.mark.parametrize("shape", [(1, 12, 12), (1, 5, 5), (3, 8, 8)])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "grey"])
@torch.no_grad()
def test_bernoulli_mlp_path_is_the_likelihoods_nll(shape, binary):
    model = sharp_mlp(shape, hidden_layers=2)
    x = torch.rand(7, *shape)
    x = (x < 0.3).float() if binary else x
    z = torch.randn(5, 7, 4)
    got = iwae.bernoulli_mlp_nll(model.decoder, x, z, step=3, bf16=False)  # steps of 3 and 2 samples
    torch.testing.assert_close(got, plain_nll(model, x, z), rtol=1e-5, atol=1e-3)


@torch.no_grad()
def test_bernoulli_mlp_path_in_bf16_is_the_nll_of_a_rounding_decoder():
    """bf16 rounds h and W before their product and the x·l terms use the same rounded values: the
    result is, to fp32 accuracy, the nll of a decoder that rounds them, so the IWAE is a bound on that
    model's log-likelihood, not an estimate whose terms stopped cancelling."""
    model = sharp_mlp((1, 12, 12))
    dec = model.decoder
    x = (torch.rand(7, 1, 12, 12) < 0.3).float()
    z = torch.randn(5, 7, 4)
    h = z.flatten(0, 1)
    for layer in dec.hidden:
        h = layer(h).relu()
    weight = dec.fc_out.weight.bfloat16().double()
    logits = h.bfloat16().double() @ weight.T + dec.fc_out.bias.double()
    targets = x.flatten(1).double().repeat(5, 1)  # rows are (sample, image)
    rounded = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).view(5, 7)
    got = iwae.bernoulli_mlp_nll(dec, x, z, step=2, bf16=True)
    torch.testing.assert_close(got.double(), rounded, rtol=1e-5, atol=2e-3)
    assert (rounded - plain_nll(model, x, z).double()).abs().max() > 0.02  # it does round


@pytest.mark.parametrize("arch", ["mlp", "conv", "resnet"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "logistic"])
@torch.no_grad()
def test_decoding_in_steps_changes_nothing(monkeypatch, arch, likelihood):
    monkeypatch.setattr(iwae, "STEP_ROWS", 10)  # 5 samples × 7 images in steps of 1 sample
    model = tiny_vae(arch, (1, 8, 8), 3, likelihood=likelihood)
    x = torch.randint(0, 256, (7, 1, 8, 8)) / 255
    x = (x > 0.5).float() if likelihood == "bernoulli" else x
    z = torch.randn(5, 7, 3)
    got = iwae.reconstruction_nll(model, x, z, bf16=False)
    torch.testing.assert_close(got, plain_nll(model, x, z), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("arch, shape", [("mlp", (1, 2, 2)), ("conv", (1, 4, 4))])
@torch.no_grad()
def test_a_bf16_decoder_still_gives_the_exact_log_likelihood_by_quadrature(arch, shape):
    """What auto picks for a Bernoulli where bf16 is native, against the fp32 model's exact log p(x)
    (a 1-D latent: a Riemann sum is exact to ~1e-9)."""
    model = tiny_vae(arch, shape, 1)
    with torch.no_grad():  # a sharper decoder: a posterior unlike q, so the samples have work to do
        last = model.decoder.fc_out if arch == "mlp" else model.decoder.convs[-1]
        last.weight.mul_(4)
    x = (torch.rand(4, *shape, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    exact = exact_log_px(model, x)
    bound = evaluate.iwae(model, x, 20_000, max_decoded=10_000, seed=0, bf16=True)
    assert (bound - exact).abs().max() < 0.02, (bound, exact)


def test_auto_precision_is_bf16_for_the_bernoulli_where_the_hardware_has_it():
    native = "bf16" if native_bf16(CPU) else "fp32"
    assert evaluate.iwae_precision("auto", CPU, "bernoulli") == native
    assert evaluate.iwae_precision("auto", CPU, "continuous_bernoulli") == "fp32"
    assert evaluate.iwae_precision("auto", CPU, "logistic") == "fp32"
    assert evaluate.iwae_precision("bf16", CPU, "logistic") == "bf16"
    assert evaluate.iwae_precision("fp32", CPU, "bernoulli") == "fp32"


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_the_scores_say_which_precision_the_iwae_used(precision, capsys):
    model = tiny_vae("mlp", (1, 12, 12), 2)
    images = np.random.default_rng(0).integers(0, 256, (40, 1, 12, 12), dtype=np.uint8)
    labels = np.arange(40) % 2
    params = EvaluateParams(
        iwae_samples=20, iwae_images=0, precision=precision, traversal_dims=2, interpolation_pairs=2
    )
    test, *_ = evaluate.score(model, images, labels, ["a", "b"], model.config, params, CPU)
    used = evaluate.iwae_precision(precision, CPU, "bernoulli")
    assert test["iwae_precision"] == used and test["iwae_images"] == 40
    assert f"(cpu, {used} decoder)" in capsys.readouterr().err


def test_a_long_iwae_says_how_long_after_its_first_batch(monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "SLOW_IWAE_S", 0)
    model = tiny_vae("mlp", (1, 4, 4), 2)
    x = (torch.rand(6, 1, 4, 4) < 0.5).float()
    evaluate.iwae(model, x, 10, max_decoded=20, seed=0)  # 2 images per batch: 3 batches
    err = capsys.readouterr().err
    assert err.count("IWAE: about") == 1 and "evaluate.iwae_images" in err


def test_bf16_products_puts_the_matmul_setting_back():
    before = torch.backends.mkldnn.matmul.fp32_precision
    with pytest.raises(RuntimeError), iwae.bf16_products(True):
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        raise RuntimeError
    assert torch.backends.mkldnn.matmul.fp32_precision == before
