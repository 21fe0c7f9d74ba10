"""model: every registered combination of arch, likelihood, prior and objective builds for grey and RGB
images of odd sizes, trains a step with a gradient for every parameter, and comes back identical from
its checkpoint; the checkpoint is plain data only, and an old one fails with one line."""

import itertools
import json
import math
import typing
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from vaeops.config import TrainParams
from vaeops.errors import UsageError
from vaeops.model.archs import ARCHS
from vaeops.model.checkpoint import (
    checkpoint,
    file_sha256,
    load_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from vaeops.model.likelihoods import LIKELIHOODS
from vaeops.model.priors import PRIORS
from vaeops.model.vae import MODEL_KEYS, build_model, model_config, objective


def choices(field: str) -> tuple[str, ...]:
    return typing.get_args(TrainParams.model_fields[field].annotation)


OBJECTIVES = choices("objective")
# Iterating over the registries: a part added to one is tested here without a new line.
COMBINATIONS = list(itertools.product(ARCHS, LIKELIHOODS, PRIORS, OBJECTIVES))
SHAPES = [(1, 13, 15), (3, 16, 12)]
LATENT, BATCH = 3, 6
# The config of a checkpoint from before the parts existed (vaeops ≤ issue 11).
OLD_CONFIG = {
    "arch": "conv",
    "latent_dim": 3,
    "hidden_dim": 16,
    "image_shape": [1, 13, 15],
    "dataset": "mnist",
}


def parts(likelihood: str, prior: str, objective: str = "elbo") -> dict:
    return {
        "likelihood": likelihood,
        "prior": prior,
        "objective": objective,
        "prior_components": 3,
        "logistic_components": 2,
    }


def targets(likelihood: str, shape: tuple[int, int, int], n: int = BATCH) -> torch.Tensor:
    """What training feeds each likelihood: binary pixels to a Bernoulli, 8-bit levels otherwise."""
    x = torch.rand(n, *shape)
    return torch.bernoulli(x) if likelihood == "bernoulli" else x.mul(255).round().div(255)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine lose much waiting for them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_registries_are_what_params_offer():
    assert set(ARCHS) == set(choices("arch"))
    assert set(LIKELIHOODS) == set(choices("likelihood"))
    assert set(PRIORS) == set(choices("prior"))
    assert OBJECTIVES == ("elbo", "iwae")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch, likelihood, prior, objective_name", COMBINATIONS)
def test_every_combination_trains_a_step_and_round_trips_its_checkpoint(
    tmp_path, arch, likelihood, prior, objective_name, shape
):
    torch.manual_seed(0)
    config = tiny_config(arch, shape, LATENT, **parts(likelihood, prior, objective_name))
    model = build_model(config)
    k = 3 if objective_name == "iwae" else 1
    x = targets(likelihood, shape)

    out, mu, logvar, z = model(x, torch.randn(k, BATCH, LATENT))
    m = model.likelihood.params_per_channel
    assert out.shape == (k, BATCH, shape[0] * m, *shape[1:])
    assert mu.shape == logvar.shape == (BATCH, LATENT) and z.shape == (k, BATCH, LATENT)
    recon, kl = model.terms(x, out, mu, logvar, z, analytic_kl=objective_name == "elbo")
    assert recon.shape == kl.shape == (k, BATCH)
    loss = objective(recon, kl, objective_name).mean()
    assert torch.isfinite(loss)

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    if prior == "vamp":
        assert "prior.pseudo_logits" in names
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
        # A bias feeding a BatchNorm (and, under a VampPrior, fc_mu's: it moves q and p(z) alike) has a
        # zero gradient by construction; float rounding alone decides whether it comes out exactly 0.
        if p.dim() > 1:
            assert p.grad.abs().sum() > 0, f"{name}: gradient is all zeros"
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    assert [n for n, p in model.named_parameters() if p.grad.any() and torch.equal(p, before[n])] == []

    model.eval()
    path = tmp_path / "vae.pt"
    save_checkpoint(path, checkpoint(model, config, run_id="abc", epoch=1))
    state, sha = read_checkpoint(path)
    assert sha == file_sha256(path)
    assert state["config"] == config and state["run_id"] == "abc" and state["epoch"] == 1
    json.dumps(state["config"])  # plain data: it rebuilds the model without any code from the file
    again = model_from_checkpoint(state, path)
    assert not again.training and again.config == config

    eps = torch.randn(k, BATCH, LATENT)
    with torch.no_grad():
        for a, b in zip(model(x, eps), again(x, eps), strict=True):
            assert torch.equal(a, b)
        zs = torch.randn(4, LATENT)
        images = again.decode(zs)
        assert torch.equal(images, model.decode(zs))
        assert images.shape == (4, *shape) and images.dtype == torch.float32
        assert 0 <= images.min() and images.max() <= 1
        gen = (torch.Generator().manual_seed(7) for _ in range(2))
        assert torch.equal(model.sample(5, next(gen)), again.sample(5, next(gen)))
        assert model(x[:1], eps[:, :1])[0].shape == (k, 1, shape[0] * m, *shape[1:])  # one image (BatchNorm)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 7, 9), (3, 13, 11), (2, 4, 5)])
@pytest.mark.parametrize("latent_dim", [1, 20])
def test_every_arch_fits_any_shape_and_latent_size(arch, shape, latent_dim):
    torch.manual_seed(0)
    model = build_model(tiny_config(arch, shape, latent_dim))
    mu, logvar = model.encode(torch.rand(5, *shape))
    assert mu.shape == logvar.shape == (5, latent_dim)
    assert model.decoder(torch.randn(5, latent_dim)).shape == (5, *shape)


@pytest.mark.parametrize("hidden_layers", [1, 2])
def test_the_default_mlp_is_the_articles_784_400_z_network(hidden_layers):
    params = TrainParams(hidden_layers=hidden_layers)
    model = build_model(model_config(params, (1, 28, 28), "mnist"))
    deep = [(400, 400)] * (hidden_layers - 1)
    article = [(784, 400), *deep, (400, 20), (400, 20), (20, 400), *deep, (400, 784)]
    sizes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sizes == article
    # Nothing else: no BatchNorm, no learned prior; the weights and biases of those layers only.
    assert sum(p.numel() for p in model.parameters()) == sum(i * o + o for i, o in article)
    assert len(model.state_dict()) == 2 * len(article)
    if hidden_layers == 1:
        assert (
            sum(p.numel() for p in model.parameters())
            == 784 * 400 + 400 + 2 * (400 * 20 + 20) + 20 * 400 + 400 + 400 * 784 + 784
        )


def test_conv_has_pooling_batchnorm_and_strided_transposed_convs():
    model = build_model(model_config(TrainParams(arch="conv"), (1, 28, 28), "mnist"))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Conv2d", "MaxPool2d", "BatchNorm1d", "ConvTranspose2d", "ReLU"} <= kinds
    assert all(m.stride == (2, 2) for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d))


def test_resnet_has_residual_blocks_and_one_stride_2_conv_per_level():
    params = TrainParams(arch="resnet", channels=[8, 16, 32])
    model = build_model(model_config(params, (3, 32, 32), "cifar10"))
    blocks = [type(m).__name__ for m in model.modules()].count("ResBlock")
    assert blocks == 2 * len(params.channels)  # one per level in the encoder and in the decoder
    strided = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == len(params.channels)


def test_model_config_holds_every_key_and_binarizes_for_the_bernoulli_only():
    for likelihood in LIKELIHOODS:
        params = TrainParams(likelihood=likelihood, binarize=True, channels=(4, 8))
        config = model_config(params, (3, 16, 12), "cifar10")
        assert set(MODEL_KEYS) <= set(config)
        assert config["image_shape"] == [3, 16, 12] and config["channels"] == [4, 8]
        assert config["dataset"] == "cifar10" and config["binarize"] == (likelihood == "bernoulli")
    assert not model_config(TrainParams(binarize=False), (1, 28, 28), "mnist")["binarize"]


def test_iwae_with_one_sample_is_the_elbo_with_a_monte_carlo_kl():
    for prior in PRIORS:
        model = build_model(tiny_config("conv", (1, 13, 15), LATENT, **parts("continuous_bernoulli", prior)))
        x = targets("continuous_bernoulli", (1, 13, 15))
        out, mu, logvar, z = model(x, torch.randn(1, BATCH, LATENT))
        recon, kl = model.terms(x, out, mu, logvar, z, analytic_kl=False)
        iwae, elbo = objective(recon, kl, "iwae"), objective(recon, kl, "elbo")
        assert iwae.shape == elbo.shape == (BATCH,)
        torch.testing.assert_close(iwae, elbo, rtol=1e-6, atol=0)
        (g_iwae,) = torch.autograd.grad(iwae.sum(), model.decoder.convs[0].weight, retain_graph=True)
        (g_elbo,) = torch.autograd.grad(elbo.sum(), model.decoder.convs[0].weight)
        torch.testing.assert_close(g_iwae, g_elbo, rtol=1e-6, atol=1e-9)


def test_the_analytic_kl_averages_to_the_monte_carlo_kl():
    model = build_model(tiny_config("mlp", (1, 13, 15), LATENT)).eval()
    x = targets("bernoulli", (1, 13, 15), 2)
    with torch.no_grad():
        out, mu, logvar, z = model(x, torch.randn(100_000, 2, LATENT))
        _, analytic = model.terms(x, out, mu, logvar, z)
        _, mc = model.terms(x, out, mu, logvar, z, analytic_kl=False)
    assert torch.equal(analytic, analytic[:1].expand_as(analytic))  # the same KL for every sample
    assert (mc.mean(0) - analytic[0]).abs().max() < 4 * mc.std(0).max() / len(mc) ** 0.5


def test_the_iwae_bound_is_at_least_the_elbo_and_grows_with_k():
    torch.manual_seed(0)
    model = build_model(tiny_config("mlp", (1, 13, 15), LATENT, prior="vamp", prior_components=3)).eval()
    x = targets("bernoulli", (1, 13, 15), 64)
    with torch.no_grad():
        out, mu, logvar, z = model(x, torch.randn(50, 64, LATENT))
        recon, kl = model.terms(x, out, mu, logvar, z, analytic_kl=False)
        # The same 50 samples: log mean exp ≥ mean log, for every image (Jensen).
        assert (-objective(recon, kl, "iwae") >= -objective(recon, kl, "elbo")).all()
        # Independent samples: E[IWAE_k] grows with k, from the ELBO at k = 1.
        bounds = []
        for k in (1, 5, 50):
            out, mu, logvar, z = model(x.repeat(20, 1, 1, 1), torch.randn(k, 20 * 64, LATENT))
            recon, kl = model.terms(x.repeat(20, 1, 1, 1), out, mu, logvar, z, analytic_kl=False)
            bounds.append(-objective(recon, kl, "iwae").mean().item())
    assert bounds[0] < bounds[1] < bounds[2]


def test_beta_weighs_the_kl_of_the_elbo_only():
    recon, kl = torch.rand(3, 4), torch.rand(3, 4)
    torch.testing.assert_close(objective(recon, kl, "elbo", beta=0.5), (recon + 0.5 * kl).mean(0))
    expected = -(torch.logsumexp(-(recon + kl), 0) - math.log(3))
    torch.testing.assert_close(objective(recon, kl, "iwae"), expected)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_vamp_with_one_pseudo_input_trains_with_every_arch(arch):
    """prior_components = 1 is a valid param: the pseudo-input alone passes through the encoder."""
    model = build_model(tiny_config(arch, (1, 13, 15), LATENT, prior="vamp", prior_components=1))
    x = targets("bernoulli", (1, 13, 15))
    out, mu, logvar, z = model(x, torch.randn(1, BATCH, LATENT))
    recon, kl = model.terms(x, out, mu, logvar, z)
    objective(recon, kl, "elbo").mean().backward()
    assert model.prior.pseudo_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "mlp"])  # the archs with BatchNorm
def test_vamp_pseudo_inputs_leave_batchnorm_running_stats_to_the_data(arch):
    """The running statistics normalize real images at evaluation: a training step's pseudo-inputs
    (a batch of their own through the encoder) must not pull them towards the pseudo-images'."""
    import copy

    torch.manual_seed(0)
    model = build_model(tiny_config(arch, (1, 13, 15), LATENT, prior="vamp", prior_components=3)).train()
    data_only = copy.deepcopy(model)
    x = targets("bernoulli", (1, 13, 15))
    out, mu, logvar, z = model(x, torch.randn(1, BATCH, LATENT))
    model.terms(x, out, mu, logvar, z)
    data_only.encode(x)
    for (name, a), b in zip(model.encoder.named_buffers(), data_only.encoder.buffers(), strict=True):
        assert torch.equal(a, b), f"encoder.{name} moved by the pseudo-inputs"


def test_old_checkpoint_without_the_part_keys_is_one_line_usage_error(tmp_path):
    old = build_model(tiny_config("conv", (1, 13, 15), 3))
    path = tmp_path / "vae.pt"
    save_checkpoint(path, {"model": old.state_dict(), "config": OLD_CONFIG, "run_id": "abc", "epoch": 4})
    with pytest.raises(UsageError) as err:
        model_from_checkpoint(load_checkpoint(path), path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: written by an older vaeops") and "\n" not in msg
    assert "hidden_layers" in msg and "likelihood" in msg and "prior" in msg and "retrain" in msg


def test_weights_that_do_not_fit_the_config_or_an_unknown_part_are_one_line_usage_errors(tmp_path):
    config = tiny_config("mlp", (1, 13, 15), 3)
    other = build_model(tiny_config("mlp", (1, 13, 15), 5))
    for state in (
        {"model": other.state_dict(), "config": config},
        {"model": other.state_dict(), "config": config | {"likelihood": "gaussian"}},
    ):
        with pytest.raises(UsageError) as err:
            model_from_checkpoint(state, "m.pt")
        assert str(err.value).startswith("m.pt: ") and "\n" not in str(err.value)


class Payload:
    """A pickle that runs code on load: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_carrying_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": OLD_CONFIG, "hook": Payload(marker)}, path)
    with pytest.raises(UsageError, match="evil.pt: not a loadable vaeops checkpoint") as refused:
        load_checkpoint(path)
    assert not marker.exists()
    assert "weights_only" not in str(refused.value)  # torch's advice is to run the code: never repeat it
    # The payload is real: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "checkpoint not found"),
        (b"not a zip", "not a loadable vaeops checkpoint"),
        ("list", "not a vaeops checkpoint"),
    ],
)
def test_missing_or_garbage_checkpoint_is_usage_error(tmp_path, content, message):
    path = tmp_path / "vae.pt"
    if content == "list":
        torch.save([1, 2], path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_checkpoint(path)


def test_checkpoint_naming_any_global_is_refused(tmp_path):
    # weights_only allows tensors and plain containers only, not even a harmless function like sqrt.
    path = tmp_path / "vae.pt"
    torch.save({"model": {}, "config": OLD_CONFIG, "f": math.sqrt}, path)
    with pytest.raises(UsageError, match="not a loadable vaeops checkpoint"):
        load_checkpoint(path)
