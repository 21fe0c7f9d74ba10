"""Encoder/decoder pairs, chosen by `train.arch`. Each takes images of any C×H×W.

An encoder maps x (B×C×H×W, in [0, 1]) to (mu, logvar); a decoder maps z (B×D) to the likelihood's
parameters, B × out_channels × H × W.

The convolutional archs keep their conv weights and feature maps channels_last (NHWC), the layout
in which oneDNN's convolutions and the CPU pooling kernels are fastest (bf16 most of all). Shapes,
values and state_dict keys are those of the plain layout, so checkpoints load either way.
"""

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

NHWC = torch.channels_last


class MLPEncoder(nn.Module):
    """pytorch/examples vae/main.py (784 → 400 → z), with the depth and widths as arguments."""

    def __init__(self, shape: tuple[int, int, int], latent_dim: int, hidden_dim: int, layers: int) -> None:
        super().__init__()
        dims = [math.prod(shape)] + [hidden_dim] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False))
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = x.flatten(1)
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.fc_mu(h), self.fc_logvar(h)


class MLPDecoder(nn.Module):
    def __init__(
        self, shape: tuple[int, int, int], latent_dim: int, hidden_dim: int, layers: int, out_channels: int
    ) -> None:
        super().__init__()
        self.out_shape = (out_channels, *shape[1:])
        dims = [latent_dim] + [hidden_dim] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False))
        self.fc_out = nn.Linear(hidden_dim, math.prod(self.out_shape))

    def features(self, z: Tensor) -> Tensor:
        """The last hidden layer's activations h: the output is fc_out(h) (evaluation.iwae uses h)."""
        h = z
        for layer in self.hidden:
            h = F.relu(layer(h))
        return h

    def forward(self, z: Tensor) -> Tensor:
        return self.fc_out(self.features(z)).view(-1, *self.out_shape)


def _dense(n_in: int, n_out: int) -> list[nn.Module]:
    return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU()]


class ConvEncoder(nn.Module):
    """The article's conv encoder: (conv + ReLU + 2× max-pool) per width, then two dense+BN+ReLU.

    The pool runs before the ReLU: the same function with the same gradient (max commutes with the
    monotone ReLU, and both pick the first of tied maxima), but the ReLU sees a quarter of the values."""

    def __init__(
        self, shape: tuple[int, int, int], latent_dim: int, hidden_dim: int, widths: list[int]
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, h, w = shape
        for width in widths:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()]
            c, h, w = width, h // 2, w // 2
        self.body = nn.Sequential(
            *layers, nn.Flatten(), *_dense(c * h * w, hidden_dim), *_dense(hidden_dim, hidden_dim)
        )
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)
        self.to(memory_format=NHWC)  # moves the conv weights only: the others are not 4-D

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x.contiguous(memory_format=NHWC))  # Flatten reads it in C, H, W order all the same
        return self.fc_mu(h), self.fc_logvar(h)


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: dense+BN+ReLU twice, reshape, one transposed conv per width.

    Pooling floors odd sizes, so each kernel-4 stride-2 transposed conv adds the lost row back with
    output_padding and lands on the exact input size."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        latent_dim: int,
        hidden_dim: int,
        widths: list[int],
        out_channels: int,
    ) -> None:
        super().__init__()
        sizes = [shape[1:]]
        for _ in widths:
            sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
        self.feat = (widths[-1], *sizes[-1])
        layers: list[nn.Module] = []
        outs = [*reversed(widths[:-1]), out_channels]
        for i, (c_in, c_out) in enumerate(zip(reversed(widths), outs, strict=True)):
            (h_in, w_in), (h, w) = sizes[-1 - i], sizes[-2 - i]
            pad = (h - 2 * h_in, w - 2 * w_in)
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, output_padding=pad), nn.ReLU()]
        self.dense = nn.Sequential(*_dense(latent_dim, hidden_dim), *_dense(hidden_dim, math.prod(self.feat)))
        self.convs = nn.Sequential(*layers[:-1])  # no ReLU on the likelihood's parameters
        self.to(memory_format=NHWC)

    def forward(self, z: Tensor) -> Tensor:
        h = self.dense(z).view(-1, *self.feat).contiguous(memory_format=NHWC)
        return self.convs(h).contiguous()  # the likelihood gets the plain layout (free for one channel)


class ResBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): x + conv(act(bn(conv(act(bn(x))))))."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.SiLU(),
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


def _halvings(shape: tuple[int, int, int], levels: int) -> list[tuple[int, int]]:
    """Spatial sizes after each stride-2 conv (kernel 3, padding 1 rounds odd sizes up)."""
    sizes = [shape[1:]]
    for _ in range(levels):
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    return sizes


class ResNetEncoder(nn.Module):
    """Per width: a residual block, then a stride-2 conv; deep enough for 32×32 RGB and 64×64."""

    def __init__(self, shape: tuple[int, int, int], latent_dim: int, widths: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(shape[0], widths[0], 3, padding=1)]
        c = widths[0]
        for width in widths:
            layers += [ResBlock(c, width), nn.Conv2d(width, width, 3, stride=2, padding=1)]
            c = width
        h, w = _halvings(shape, len(widths))[-1]
        self.body = nn.Sequential(*layers, nn.BatchNorm2d(c), nn.SiLU(), nn.Flatten())
        self.fc = nn.Linear(c * h * w, 2 * latent_dim)
        self.to(memory_format=NHWC)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.fc(self.body(x.contiguous(memory_format=NHWC))).chunk(2, dim=1)
        return mu, logvar


class ResNetDecoder(nn.Module):
    """Mirror of ResNetEncoder: per width, a stride-2 transposed conv back to the encoder's size there
    (output_padding undoes the rounding), then a residual block."""

    def __init__(
        self, shape: tuple[int, int, int], latent_dim: int, widths: list[int], out_channels: int
    ) -> None:
        super().__init__()
        sizes = _halvings(shape, len(widths))
        self.feat = (widths[-1], *sizes[-1])
        self.fc = nn.Linear(latent_dim, math.prod(self.feat))
        layers: list[nn.Module] = []
        c = widths[-1]
        for i, width in enumerate(reversed(widths)):
            (h_in, w_in), (h, w) = sizes[-1 - i], sizes[-2 - i]
            pad = (h - 2 * h_in + 1, w - 2 * w_in + 1)
            layers += [
                nn.ConvTranspose2d(c, width, 3, stride=2, padding=1, output_padding=pad),
                ResBlock(width, width),
            ]
            c = width
        self.body = nn.Sequential(
            *layers, nn.BatchNorm2d(c), nn.SiLU(), nn.Conv2d(c, out_channels, 3, padding=1)
        )
        self.to(memory_format=NHWC)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.fc(z).view(-1, *self.feat).contiguous(memory_format=NHWC)).contiguous()


def mlp(
    shape: tuple[int, int, int], latent_dim: int, out_channels: int, cfg: dict
) -> tuple[nn.Module, nn.Module]:
    h, n = cfg["hidden_dim"], cfg["hidden_layers"]
    return MLPEncoder(shape, latent_dim, h, n), MLPDecoder(shape, latent_dim, h, n, out_channels)


def conv(
    shape: tuple[int, int, int], latent_dim: int, out_channels: int, cfg: dict
) -> tuple[nn.Module, nn.Module]:
    h, widths = cfg["hidden_dim"], cfg["channels"]
    return ConvEncoder(shape, latent_dim, h, widths), ConvDecoder(shape, latent_dim, h, widths, out_channels)


def resnet(
    shape: tuple[int, int, int], latent_dim: int, out_channels: int, cfg: dict
) -> tuple[nn.Module, nn.Module]:
    widths = cfg["channels"]
    return ResNetEncoder(shape, latent_dim, widths), ResNetDecoder(shape, latent_dim, widths, out_channels)


ARCHS = {"mlp": mlp, "conv": conv, "resnet": resnet}


def min_size(arch: str, levels: int) -> int:
    """Smallest H or W the arch can take: conv pools `levels` times, flooring; the others round up."""
    return 2**levels if arch == "conv" else 1
