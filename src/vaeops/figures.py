"""Image grids as uint8 arrays, and PNG files written atomically."""

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vaeops.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL.ImageFont import FreeTypeFont


def grid(images: np.ndarray, nrow: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """N×C×H×W floats in [0, 1] → one H'×W'×3 uint8 picture, `nrow` images per row."""
    images = np.asarray(images, dtype=np.float32)
    n, c, h, w = images.shape
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
    scale: int = 3,
    pad: int = 2,
) -> np.ndarray:
    """grid() upscaled `scale`× with a title band on top and optional row labels on the left.

    Size: HEADER_H + scale·grid_h tall; scale·grid_w wide plus, with row labels, a column as wide as
    the longest label + 20 px.
    """
    from PIL import Image, ImageDraw

    body = grid(images, nrow, pad=pad).repeat(scale, 0).repeat(scale, 1)
    label_font = _font(14)
    label_w = int(max(label_font.getlength(t) for t in row_labels)) + 20 if row_labels else 0
    canvas = Image.new("RGB", (label_w + body.shape[1], HEADER_H + body.shape[0]), "white")
    canvas.paste(Image.fromarray(body), (label_w, HEADER_H))
    draw = ImageDraw.Draw(canvas)
    draw.text((canvas.width / 2, 20), title, fill=INK, font=_font(18), anchor="mm")
    if subtitle:
        draw.text((canvas.width / 2, 43), subtitle, fill=MUTED, font=_font(13), anchor="mm")
    h = images.shape[2]
    for r, label in enumerate(row_labels or []):
        y = HEADER_H + (pad + r * (h + pad) + h / 2) * scale
        draw.text((label_w - 10, y), label, fill=INK, font=label_font, anchor="rm")
    return np.asarray(canvas)


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


def elbo_histogram(elbo: np.ndarray, worst: np.ndarray, worst_elbo: np.ndarray, title: str) -> np.ndarray:
    """Histogram of per-image ELBO above a strip of the lowest-scoring images. 1000×700 px.

    worst: M×C×H×W images in [0, 1], worst_elbo their scores (the strip is the anomaly view).
    """
    fig = _figure(10, 7)
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.6, 1])
    ax = top.add_subplot()
    ax.hist(elbo, bins=100, color="#4c72b0", alpha=0.85)
    mean, p1 = float(elbo.mean()), float(np.percentile(elbo, 1))
    ax.axvline(mean, color="#222222", linestyle="--", linewidth=1.2, label=f"mean {mean:.1f}")
    ax.axvline(p1, color="#c44e52", linewidth=1.5, label=f"1st percentile {p1:.1f} (anomaly threshold)")
    ax.set_xlabel("ELBO per test image (nats, higher = more typical)")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(loc="upper left", frameon=False)
    ax.grid(alpha=0.2)
    bottom.suptitle("lowest-ELBO test images (most anomalous to the model)", fontsize=11)
    axes = bottom.subplots(1, len(worst))
    for a, img, score in zip(np.atleast_1d(axes), worst, worst_elbo, strict=True):
        a.imshow(_hwc(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        a.set_title(f"{score:.0f}", fontsize=10)
        a.axis("off")
    return _render(fig)


def _hwc(image: np.ndarray) -> np.ndarray:
    """C×H×W → H×W (grey) or H×W×C, as imshow wants it."""
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def manifold(images: np.ndarray, values: np.ndarray, title: str) -> np.ndarray:
    """n×n decoded images (row-major, top row = highest z1) on a grid over z0, z1 = `values`. 800×800 px."""
    n = len(values)
    pic = grid(images, n, pad=0)
    fig = _figure(8, 8)
    ax = fig.add_subplot()
    step = values[1] - values[0] if n > 1 else 1.0
    extent = (values[0] - step / 2, values[-1] + step / 2, values[0] - step / 2, values[-1] + step / 2)
    ax.imshow(pic, extent=extent, interpolation="nearest")
    ax.set_xlabel("z0")
    ax.set_ylabel("z1")
    ax.set_title(title)
    return _render(fig)
