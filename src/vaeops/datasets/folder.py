"""Your own images (`data.dataset: folder`): PNG/JPEG files under `data.path`.

With sub-folders, each one is a class (sorted names → labels 0..K-1) and holds that class's images,
at any depth; without, every image is of one class named after the folder. Hidden files and
folders are skipped.

download copies the images into data/raw/folder/images/ (class sub-folders kept) with a manifest
of each one's label and SHA-256, so DVC caches exactly the images used. preprocess checks each copy
against the manifest, converts it to greyscale or RGB (`data.channels`), crops the largest centred
square and resizes that to `data.image_size` with Lanczos: shrinking photos is the usual case,
and Lanczos keeps them the sharpest of Pillow's (antialiasing) filters.
"""

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from vaeops.config import DataParams
from vaeops.datasets.common import REDO, Splits, progress
from vaeops.errors import UsageError
from vaeops.io import atomic_folder
from vaeops.progress import log

EXTENSIONS = (".png", ".jpg", ".jpeg")
FORMATS = ("PNG", "JPEG")  # what Pillow may decode them as: no other of its many decoders
IMAGES = "images"
MANIFEST = "manifest.json"
# DVC cannot see the files under data.path, so a change there needs a forced download.
RECOPY = "then run `vaeops download` (or `dvc repro -f download`)"


@dataclass(frozen=True)
class FolderSpec:
    name: str

    def read(self, folder: Path, data: DataParams) -> Splits:
        manifest = read_manifest(folder)
        entries = manifest["images"]
        images = read_images(folder, manifest["source"], entries, data.image_size, data.channels)
        labels = np.array([e["label"] for e in entries], np.int64)
        # No official test split: preprocess splits one off (preprocess.test_size).
        return Splits((images, labels), None, tuple(manifest["classes"]))


FOLDER = FolderSpec(name="folder")


def source(data: DataParams) -> Path:
    """data.path as a folder: relative paths are from the project root."""
    if not data.path.strip():
        raise UsageError(
            "data.dataset = 'folder' reads your images from data.path, which is empty; set it to their folder"
        )
    from vaeops.tracking import project_root  # the real project, also in a queued experiment's copy

    path = Path(data.path).expanduser()
    return (path if path.is_absolute() else project_root() / path).resolve()


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in EXTENSIONS and path.is_file()


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def scan(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class names and each image with its label, in a fixed order; refuses a mixed layout."""
    if not root.is_dir():
        what = "not found" if not root.exists() else "not a folder"
        raise UsageError(f"{root}: {what} (data.path); point data.path at the folder of your images")
    children = sorted(p for p in root.iterdir() if _visible(p, root))
    subdirs = [p for p in children if p.is_dir()]
    top = [p for p in children if _is_image(p)]
    if subdirs and top:
        raise UsageError(
            f"{root}: mixed layout, {len(top)} images at the top ({top[0].name}, …) beside the class "
            f"sub-folders ({subdirs[0].name}/, …); move them into a class sub-folder or remove them"
        )
    if not subdirs:
        if not top:
            raise UsageError(
                f"{root}: no .png, .jpg or .jpeg images (data.path); put your images there, "
                "in one sub-folder per class or none"
            )
        return [root.name], [(p, 0) for p in top]
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(subdirs):
        found = sorted(p for p in folder.rglob("*") if _visible(p, folder) and _is_image(p))
        if not found:
            raise UsageError(
                f"{folder}: class sub-folder without .png, .jpg or .jpeg images; add some or remove it"
            )
        files += [(p, label) for p in found]
    return [p.name for p in subdirs], files


def _reason(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not a PNG or JPEG image"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return first[:200]


def download(data: DataParams, out_dir: Path) -> dict[str, str]:
    """Copy data.path's images into `out_dir` with their manifest, all or nothing; return file -> source."""
    from PIL import Image

    root = source(data)
    out = out_dir.resolve()
    if root == out or root in out.parents or out in root.parents:
        # Replacing out_dir would delete the images, or the copy would be scanned as images.
        raise UsageError(
            f"{root}: data.path overlaps download's output {out_dir}; keep your images elsewhere"
        )
    classes, files = scan(root)
    entries = []
    with atomic_folder(out_dir) as tmp:
        for path, label in progress(files, f"copying {root}"):
            try:
                blob = path.read_bytes()
            except OSError as e:
                raise UsageError(
                    f"{path}: cannot read it ({e.strerror}); fix its permissions or remove it"
                ) from None
            # Headers and, for PNG, every chunk's checksum: a broken file is named now, not at
            # preprocess. Decoding all pixels is left to preprocess, which does it anyway.
            try:
                with Image.open(io.BytesIO(blob), formats=FORMATS) as im:
                    im.verify()
            except Exception as e:  # Pillow raises many kinds for a broken file
                raise UsageError(f"{path}: unreadable image ({_reason(e)}); fix or remove it") from None
            rel = path.relative_to(root)
            target = tmp / IMAGES / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)
            sha = hashlib.sha256(blob).hexdigest()
            entries.append({"path": rel.as_posix(), "label": label, "sha256": sha})
        manifest = {"source": str(root), "classes": classes, "images": entries}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"folder: {len(entries)} images of {len(classes)} classes, copied from {root}")
    return {e["path"]: str(root) for e in entries}


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        what = "missing" if not path.exists() else "not a file"
        raise UsageError(f"{path}: {what}; run {REDO} first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        classes, entries, src = manifest["classes"], manifest["images"], manifest["source"]
        ok = (
            isinstance(src, str)
            and isinstance(classes, list)
            and all(isinstance(c, str) for c in classes)
            and isinstance(entries, list)
            and all(_entry_ok(e, len(classes)) for e in entries)
            and len(entries) > 0
        )
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise UsageError(f"{path}: not a manifest that download wrote; run {REDO} again")
    return manifest


def _entry_ok(entry: object, n_classes: int) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return False
    rel = PurePosixPath(entry["path"])
    return (
        not rel.is_absolute()
        and ".." not in rel.parts
        and isinstance(entry.get("sha256"), str)
        and type(entry.get("label")) is int
        and 0 <= entry["label"] < n_classes
    )


def read_images(folder: Path, src: str, entries: list[dict], size: int, channels: int) -> np.ndarray:
    """The images download copied, each checked against its SHA-256, as uint8 N×C×size×size.

    Only the output array grows with the folder: one file at a time is read and decoded.
    """
    from PIL import Image, ImageOps

    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(entries), channels, size, size), np.uint8)
    for i, entry in enumerate(progress(entries, f"reading {folder}")):
        path = folder / IMAGES / entry["path"]
        try:
            blob = path.read_bytes()
        except OSError:
            raise UsageError(f"{path}: missing or unreadable; run {REDO} again") from None
        got = hashlib.sha256(blob).hexdigest()
        if got != entry["sha256"]:
            raise UsageError(
                f"{path}: changed since download copied it (sha256 {got[:12]}…, expected "
                f"{entry['sha256'][:12]}…); run {REDO} to copy it again"
            )
        try:
            with Image.open(io.BytesIO(blob), formats=FORMATS) as im:
                # Camera JPEGs store their rotation in EXIF; apply it before cropping.
                upright = ImageOps.exif_transpose(im).convert(mode)
                square = ImageOps.fit(upright, (size, size), Image.Resampling.LANCZOS)
        except Exception as e:  # Pillow raises many kinds for a broken file (a truncated JPEG here)
            original = Path(src) / entry["path"]
            raise UsageError(
                f"{path}: unreadable image ({_reason(e)}); fix or remove {original}, {RECOPY}"
            ) from None
        pixels = np.asarray(square)
        out[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return out
