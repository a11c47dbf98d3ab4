"""Image files without torch: find them, and decode one into the uint8 pixels a model was trained on.

prepare-data decodes training images with `open_resized` (`sources.FileRows`, on every core); predict
decodes new images with it too (`decode_image`), on both its paths: the PyTorch one and the ONNX one,
which must run where torch is not installed. So this module imports only the standard library,
numpy and Pillow, never torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .console import warn
from .errors import UserError, first_line, reraise_interrupt
from .params import plural


def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of the formats this PIL can open, not only save."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def images_below(folder: Path, extensions: frozenset[str], links: list[str] | None = None) -> tuple[list[str], int]:
    """Image files under `folder` (recursive, sorted) and how many other visible files were ignored.

    Folder links are followed, unless `links` is given: then they are listed there instead (prepare-data's
    data, where DVC tracks a linked file's content but not what a folder link points to)."""
    images, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=links is None):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # do not descend into hidden folders
        if links is not None:
            links += [os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in extensions:
                images.append(os.path.join(dirpath, name))
            else:
                ignored += 1
    return sorted(images), ignored


def eight_bit(img: Image.Image) -> Image.Image:
    """16-bit greyscale -> 8-bit by scaling; PIL's own convert clips everything above 255 to white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(img).astype(np.int64).clip(0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8))  # 2-D uint8 -> mode "L"
    return img


def flatten_on_white(img: Image.Image) -> Image.Image:
    """Composite images with transparency onto white.

    A plain convert drops alpha and shows whatever colour the encoder left under the
    transparent pixels (often black), so the same picture would look different
    depending on how it was saved; white is what viewers and most documents show.
    """
    if not img.has_transparency_data:
        return img
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The region of a width x height image that torchvision's Resize(size) + CenterCrop(size) keep,
    in the image's own pixels, so that one resize of that region gives the same pixels.

    Resize scales the shorter side to `size` and the longer to int(size * longer / shorter);
    CenterCrop then starts at round((resized - size) / 2) on each axis.
    """
    if width <= height:
        resized_w, resized_h = size, int(size * height / width)
    else:
        resized_w, resized_h = int(size * width / height), size
    left, top = round((resized_w - size) / 2), round((resized_h - size) / 2)
    sx, sy = width / resized_w, height / resized_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


class Unreadable(Exception):
    """A file that is not an image PIL can read; its message is the reason, quoted in one line."""


def open_resized(path: str, mode: str, size: int, resize: str) -> Image.Image:
    """One file -> a `mode` image of size x size, as the training images were prepared; raises for a damaged
    file (PIL raises OSError, SyntaxError, ValueError, EOFError, ...; an empty file raises Unreadable).

    mode: "L" or "RGB"; resize: "crop" or "stretch" (data.resize)."""
    try:
        img = Image.open(path)
    except Exception:
        if os.path.getsize(path) == 0:  # asked only of a file PIL refuses: a stat per image costs 1% here
            raise Unreadable("the file is empty") from None
        raise
    with img:
        # JPEG: decode at 1/2..1/8 scale where the result stays at least size x size; far
        # faster for photos. Must come before anything (exif_transpose) loads the pixels.
        img.draft(mode, (size, size))
        ImageOps.exif_transpose(img, in_place=True)  # photos: upright as viewers show them
        img = flatten_on_white(eight_bit(img))
        if img.mode != mode:
            img = img.convert(mode)
        box = crop_box(*img.size, size) if resize == "crop" else None
        return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


def channels_first(img: Image.Image, out: np.ndarray) -> None:
    """An "L" or "RGB" image's pixels into `out`, uint8 (C, H, W), one band at a time: Pillow's raw packer
    copies a band out on its own, about twice as fast here as numpy's transpose of the (H, W, C) array."""
    for k, band in enumerate(img.getbands()):
        out[k] = np.frombuffer(img.tobytes("raw", band), dtype=np.uint8).reshape(out.shape[1:])


def decode_image(path: str, mode: str, size: int, resize: str) -> np.ndarray | str:
    """One file -> uint8 (C, size, size) as `open_resized` prepares it, or the reason it cannot be read."""
    try:
        img = open_resized(path, mode, size, resize)
    except Exception as exc:  # any damage a file can have: the reason goes into the one-line message
        reraise_interrupt(exc)  # a Ctrl-C while decoding is not a damaged file
        return first_line(exc)
    pixels = np.empty((len(img.getbands()), *img.size[::-1]), dtype=np.uint8)
    channels_first(img, pixels)
    return pixels


def find_images(inputs: list[Path]) -> list[str]:
    """The files named, and the image files below the folders named (recursively, sorted), once each."""
    extensions = image_extensions()
    found: dict[str, None] = {}  # ordered, without repeats
    for path in inputs:
        if path.is_dir():
            paths, ignored = images_below(path, extensions)
            if ignored:
                warn(f"ignored {plural(ignored, 'file')} under {path} whose extension is not an image format")
            found.update(dict.fromkeys(paths))
        elif path.is_file():
            found[str(path)] = None
        else:
            raise UserError(f"{path} does not exist; name image files or folders of images")
    if not found:
        raise UserError(f"no image files in {', '.join(map(str, inputs))}: expected files PIL can open "
                        "(.png, .jpg, .bmp, .webp, ...)")
    return list(found)
