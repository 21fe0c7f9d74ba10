"""models: both VAEs build for any image shape and latent size; the checkpoint is plain data only."""

import math
from pathlib import Path

import pytest
import torch

from vaeops.errors import UsageError
from vaeops.models import (
    MLPVAE,
    ConvVAE,
    build_model,
    checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)

SHAPES = [(1, 28, 28), (1, 7, 9), (3, 13, 11), (2, 4, 5)]
CONFIG = {"arch": "conv", "latent_dim": 3, "hidden_dim": 16, "image_shape": [1, 13, 15], "dataset": "mnist"}


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("latent_dim", [1, 20])
def test_both_archs_round_trip_any_shape(arch, shape, latent_dim):
    torch.manual_seed(0)
    model = build_model(arch, shape, latent_dim, hidden_dim=16)
    x = torch.rand(5, *shape)
    logits, mu, logvar = model(x)
    assert logits.shape == (5, *shape) and mu.shape == logvar.shape == (5, latent_dim)
    z = torch.randn(5, latent_dim)
    images = model.decode(z)
    assert images.shape == (5, *shape) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, torch.sigmoid(model.decode_logits(z)))  # logits inside, images outside
    model.eval()
    assert model(x[:1])[0].shape == (1, *shape)  # eval mode handles a single image (BatchNorm)


def test_mlp_is_the_articles_network():
    model = MLPVAE((1, 28, 28), 20, 400)
    sizes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sizes == [(784, 400), (400, 20), (400, 20), (20, 400), (400, 784)]


def test_conv_has_pooling_batchnorm_and_strided_transposed_convs():
    model = ConvVAE((1, 28, 28), 20, 400)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Conv2d", "MaxPool2d", "BatchNorm1d", "ConvTranspose2d", "ReLU"} <= kinds
    assert all(m.stride == (2, 2) for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d))


def test_unknown_arch_is_usage_error():
    with pytest.raises(UsageError, match="train.arch = 'rnn'"):
        build_model("rnn", (1, 28, 28), 2, 8)


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("conv", (1, 13, 15), 3, 16)
    model.train()
    model(torch.rand(8, 1, 13, 15))  # move BatchNorm running stats off their defaults
    model.eval()
    path = tmp_path / "vae.pt"
    save_checkpoint(path, checkpoint(model, CONFIG, run_id="abc", epoch=4))
    state = load_checkpoint(path)
    assert state["config"] == CONFIG and state["run_id"] == "abc" and state["epoch"] == 4
    again = model_from_checkpoint(state)
    assert not again.training
    z = torch.randn(4, 3)
    assert torch.equal(again.decode(z), model.decode(z))


class Payload:
    """A pickle that runs code on load: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_carrying_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": CONFIG, "hook": Payload(marker)}, path)
    with pytest.raises(UsageError, match="evil.pt: not a loadable vaeops checkpoint") as refused:
        load_checkpoint(path)
    assert not marker.exists()
    assert "weights_only" not in str(refused.value)  # torch's advice is to run the code: never repeat it
    # The payload is real: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [(None, "checkpoint not found"), (b"not a zip", "not a loadable vaeops checkpoint")],
)
def test_missing_or_garbage_checkpoint_is_usage_error(tmp_path, content, message):
    path = tmp_path / "vae.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_checkpoint(path)


def test_checkpoint_naming_any_global_is_refused(tmp_path):
    # weights_only allows tensors and plain containers only, not even a harmless function like sqrt.
    path = tmp_path / "vae.pt"
    torch.save({"model": {}, "config": CONFIG, "f": math.sqrt}, path)
    with pytest.raises(UsageError, match="not a loadable vaeops checkpoint"):
        load_checkpoint(path)
