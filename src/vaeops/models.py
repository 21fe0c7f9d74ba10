"""The article's two VAEs, and the checkpoint that rebuilds them.

Decoders return logits; `decode` applies the sigmoid, keeping the article's image-out API while the
loss uses the numerically stable BCE-with-logits.
"""

import hashlib
import io
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vaeops.errors import UsageError


class VAE(nn.Module):
    """Shared VAE plumbing; subclasses define `encode(x) -> (mu, logvar)` and `decode_logits(z)`."""

    latent_dim: int
    image_shape: tuple[int, int, int]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def decode_logits(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def reparameterize(self, mu: Tensor, logvar: Tensor, eps: Tensor | None = None) -> Tensor:
        std = torch.exp(0.5 * logvar)
        if eps is None:
            eps = torch.randn_like(std)
        return mu + eps * std

    def forward(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (reconstruction logits, mu, logvar). `eps`, if given, is the N(0, I) noise to use
        (distributed training draws it for the global batch and hands each rank its rows)."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, eps)
        return self.decode_logits(z), mu, logvar


class MLPVAE(VAE):
    """pytorch/examples vae/main.py, with the image shape and hidden size as arguments."""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, hidden_dim: int = 400) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        n = math.prod(image_shape)
        self.fc1 = nn.Linear(n, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, latent_dim)
        self.fc22 = nn.Linear(hidden_dim, latent_dim)
        self.fc3 = nn.Linear(latent_dim, hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, n)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h1 = F.relu(self.fc1(x.flatten(1)))
        return self.fc21(h1), self.fc22(h1)

    def decode_logits(self, z: Tensor) -> Tensor:
        h3 = F.relu(self.fc3(z))
        return self.fc4(h3).view(-1, *self.image_shape)


class ConvVAE(VAE):
    """The article's conv VAE: conv+pool+ReLU → 2 × (dense+BN+ReLU) → mu, logvar; mirrored decoder.

    Two 2× poolings, so any H, W ≥ 4 works: the transposed convs use output_padding to land back on
    the exact input size when H or W is not a multiple of 4.
    """

    def __init__(
        self, image_shape: tuple[int, int, int], latent_dim: int, hidden_dim: int = 400, channels: int = 32
    ) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        c, h, w = image_shape
        h1, w1 = h // 2, w // 2
        h2, w2 = h1 // 2, w1 // 2
        self.feat = (2 * channels, h2, w2)
        n_feat = math.prod(self.feat)
        self.encoder = nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(n_feat, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
        )
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)
        self.decoder_fc = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, n_feat),
            nn.BatchNorm1d(n_feat),
            nn.ReLU(),
        )
        # kernel 4, stride 2, padding 1 doubles the size; output_padding adds back a pooled-off row.
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(
                2 * channels, channels, 4, stride=2, padding=1, output_padding=(h1 - 2 * h2, w1 - 2 * w2)
            ),
            nn.ReLU(),
            nn.ConvTranspose2d(channels, c, 4, stride=2, padding=1, output_padding=(h - 2 * h1, w - 2 * w1)),
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.decoder_conv(self.decoder_fc(z).view(-1, *self.feat))


def resolve_device(name: str, key: str) -> torch.device:
    """`auto` | `cpu` | `cuda` (the value of params key `key`) → a torch device; cuda must exist."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{key} = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def build_model(arch: str, image_shape: tuple[int, int, int], latent_dim: int, hidden_dim: int) -> VAE:
    if arch == "mlp":
        return MLPVAE(image_shape, latent_dim, hidden_dim)
    if arch == "conv":
        return ConvVAE(image_shape, latent_dim, hidden_dim)
    raise UsageError(f"train.arch = {arch!r} is not allowed; expected 'mlp' or 'conv'")


# The checkpoint is plain data (tensors, str, int, float, lists, dicts) so it loads with
# weights_only=True: a file carrying code is refused instead of executed.
def checkpoint(model: VAE, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """config: arch, latent_dim, hidden_dim, image_shape, dataset (enough to rebuild the model)."""
    return {"model": model.state_dict(), "config": dict(config), **extra}


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    from vaeops.io import atomic_path

    # Serialised in memory first: torch.save straight to a full disk fails with an opaque C++ error,
    # while a plain write says "no space left on device".
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    return read_checkpoint(path)[0]


def read_checkpoint(path: Path | str) -> tuple[dict[str, Any], str]:
    """(state, SHA-256 of its bytes). The file is read once, so the hash names exactly what was loaded:
    a stage can later tell whether the file it read has been replaced (`file_sha256`)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: checkpoint not found; run `dvc repro train` first")
    data = path.read_bytes()
    state = load_checkpoint_bytes(data, path)
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise UsageError(
            f"{path}: not a vaeops checkpoint (expected a dict with 'model' and 'config'); "
            "retrain with `dvc repro train`"
        )
    return state, hashlib.sha256(data).hexdigest()


def load_checkpoint_bytes(data: bytes, name: Path | str = "checkpoint") -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol before refusing
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, i.e. running code from the file: never that.
        raise UsageError(
            f"{name}: not a loadable vaeops checkpoint (it holds more than tensors and plain values, or is "
            "not a torch file); retrain with `dvc repro train`"
        ) from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{name}: not a loadable vaeops checkpoint ({first[:200]})") from None


def file_sha256(path: Path | str) -> str | None:
    """SHA-256 of the file's bytes; None when it is gone."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def model_from_checkpoint(state: dict[str, Any]) -> VAE:
    cfg = state["config"]
    model = build_model(cfg["arch"], tuple(cfg["image_shape"]), cfg["latent_dim"], cfg["hidden_dim"])
    model.load_state_dict(state["model"])
    return model.eval()
