"""Image grids as uint8 arrays, and PNG files written atomically."""

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vaeops.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL.ImageFont import FreeTypeFont


def grid(images: np.ndarray, nrow: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """N×C×H×W floats in [0, 1], C = 1 (grey) or 3 (RGB) → one H'×W'×3 uint8 picture, `nrow` images
    per row."""
    images = np.asarray(images, dtype=np.float32)
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"images have {c} channels; a grid shows 1 (grey) or 3 (RGB)")
    if c == 1:
        images = np.repeat(images, 3, axis=1)
    ncol = nrow
    rows = -(-n // ncol)
    out = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), pad_value, dtype=np.uint8)
    pix = (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y : y + h, x : x + w] = pix[i]
    return out


def save_png(path: Path | str, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


# Titled, labelled pictures for the evaluate stage. Image grids are drawn pixel-exact with Pillow
# (integer upscaling, no resampling blur); charts with axes use matplotlib's Agg canvas directly,
# without pyplot, so no global figure state or display backend is involved.

HEADER_H = 56  # px: a title line and a smaller subtitle line above every picture
TILE_PX = 84  # labelled grids upscale small images to about this size (28×28 MNIST: 3×), never down
INK = (34, 34, 34)
MUTED = (110, 110, 110)


def _font(size: int) -> "FreeTypeFont":
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def labelled_grid(
    images: np.ndarray,
    nrow: int,
    title: str,
    subtitle: str = "",
    row_labels: list[str] | None = None,
    scale: int | None = None,
    pad: int = 2,
) -> np.ndarray:
    """grid() upscaled `scale`× with a title band on top and optional row labels on the left.

    Size: HEADER_H + scale·grid_h tall; scale·grid_w wide plus, with row labels, a column as wide as
    the longest label + 20 px; wider where the title or subtitle needs it (the grid then centred).
    scale: by default `grid_scale` of the image size.
    """
    from PIL import Image, ImageDraw

    scale = scale or grid_scale(images.shape[2], images.shape[3])
    body = grid(images, nrow, pad=pad).repeat(scale, 0).repeat(scale, 1)
    title_font, subtitle_font, label_font = _font(18), _font(13), _font(14)
    label_w = int(max(label_font.getlength(t) for t in row_labels)) + 20 if row_labels else 0
    text_w = int(max(title_font.getlength(title), subtitle_font.getlength(subtitle))) + 20
    width = max(label_w + body.shape[1], text_w)
    left = label_w + (width - label_w - body.shape[1]) // 2
    canvas = Image.new("RGB", (width, HEADER_H + body.shape[0]), "white")
    canvas.paste(Image.fromarray(body), (left, HEADER_H))
    draw = ImageDraw.Draw(canvas)
    draw.text((canvas.width / 2, 20), title, fill=INK, font=title_font, anchor="mm")
    if subtitle:
        draw.text((canvas.width / 2, 43), subtitle, fill=MUTED, font=subtitle_font, anchor="mm")
    h = images.shape[2]
    for r, label in enumerate(row_labels or []):
        y = HEADER_H + (pad + r * (h + pad) + h / 2) * scale
        draw.text((left - 10, y), label, fill=INK, font=label_font, anchor="rm")
    return np.asarray(canvas)


def grid_scale(h: int, w: int) -> int:
    """The integer upscaling of labelled grids: 3 for images up to 28 px, 1 from 84 px."""
    return max(1, min(3, TILE_PX // max(h, w)))


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _render(fig: "Figure") -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def latent_map(
    points: np.ndarray, labels: np.ndarray, classes: list[str], xlabel: str, ylabel: str, title: str
) -> np.ndarray:
    """Scatter of 2-D latent points coloured by class, legend outside the axes. 900×700 px."""
    from matplotlib import patheffects

    fig = _figure(9, 7)
    ax = fig.add_subplot()
    cmap = _class_colours(len(classes))
    # Shuffled drawing order, so the last class drawn does not hide the others.
    order = np.random.default_rng(0).permutation(len(points))
    ax.scatter(points[order, 0], points[order, 1], c=cmap[labels[order]], s=4, alpha=0.6, linewidths=0)
    for i, name in enumerate(classes):
        ax.scatter([], [], color=cmap[i], s=30, label=name)
        if (labels == i).any():  # the class name at its median point, readable over the cloud
            x, y = np.median(points[labels == i], 0)
            ax.text(
                x,
                y,
                name,
                color=cmap[i],
                fontsize=13,
                fontweight="bold",
                ha="center",
                va="center",
                path_effects=[patheffects.withStroke(linewidth=3, foreground="white")],
            )
    ax.legend(title="class", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.2)
    return _render(fig)


def _class_colours(n: int) -> np.ndarray:
    from matplotlib import colormaps

    name = "tab10" if n <= 10 else "tab20"
    return np.array([colormaps[name](i % 20) for i in range(n)])


def score_histogram(
    values: np.ndarray,
    worst: np.ndarray,
    worst_values: np.ndarray,
    title: str,
    xlabel: str,
    higher_is_better: bool = True,
) -> np.ndarray:
    """Histogram of a per-image score above a strip of the least typical images. 1000×700 px.

    worst: M×C×H×W images in [0, 1], worst_values their scores (the strip is the anomaly view). The
    anomaly threshold is the 1st percentile of a score where higher is better (the ELBO), else the
    99th (a loss).
    """
    fig = _figure(10, 7)
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.6, 1])
    ax = top.add_subplot()
    ax.hist(values, bins=100, color="#4c72b0", alpha=0.85)
    pct, rank = (1, "1st") if higher_is_better else (99, "99th")
    mean, threshold = float(values.mean()), float(np.percentile(values, pct))
    ax.axvline(mean, color="#222222", linestyle="--", linewidth=1.2, label=f"mean {mean:.1f}")
    label = f"{rank} percentile {threshold:.1f} (anomaly threshold)"
    ax.axvline(threshold, color="#c44e52", linewidth=1.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(loc="upper left", frameon=False)
    ax.grid(alpha=0.2)
    bottom.suptitle("least typical test images (most anomalous to the model)", fontsize=11)
    axes = bottom.subplots(1, len(worst))
    for a, img, score in zip(np.atleast_1d(axes), worst, worst_values, strict=True):
        a.imshow(_hwc(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        a.set_title(f"{score:.0f}", fontsize=10)
        a.axis("off")
    return _render(fig)


def _hwc(image: np.ndarray) -> np.ndarray:
    """C×H×W → H×W (grey) or H×W×C, as imshow wants it."""
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def manifold(images: np.ndarray, z0: np.ndarray, z1: np.ndarray, title: str) -> np.ndarray:
    """n×n decoded images (row-major, top row = highest z1) on a grid over z0 (columns, ascending) and
    z1 (rows). 800×800 px. The grid need not be evenly spaced: ticks sit at tile centres and name their
    z there."""
    n = len(z0)
    pic = grid(images, n, pad=0)
    h, w = images.shape[2:]
    fig = _figure(8, 8)
    ax = fig.add_subplot()
    ax.imshow(pic, interpolation="nearest")
    ticks = np.unique(np.linspace(0, n - 1, min(n, 5)).round().astype(int))
    ax.set_xticks((ticks + 0.5) * w - 0.5, [f"{z0[i]:.2g}" for i in ticks])
    ax.set_yticks((ticks + 0.5) * h - 0.5, [f"{z1[::-1][i]:.2g}" for i in ticks])
    ax.set_xlabel("z0")
    ax.set_ylabel("z1")
    ax.set_title(title)
    return _render(fig)
