"""Qwen3-VL image preprocessing in NumPy/PIL.

Same arithmetic as ``transformers``' ``Qwen2VLImageProcessor`` configured as Qwen3-VL
(patch 16, merge 2, temporal patch 2, mean = std = 0.5): RGB conversion (transparency
composited onto white), ``smart_resize`` to a multiple of ``patch_size * merge_size`` with
bicubic resampling, rescale by 1/255, normalise, duplicate the frame ``temporal_patch_size``
times and patchify into rows of ``C * T * P * P`` values in the merge-window order the
vision tower expects (each 2x2 merge window's four patches are consecutive rows).
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from jdelta.errors import UserError

# Qwen3-VL's preprocessor_config.json: size {shortest_edge: 65536, longest_edge: 16777216}.
QWEN3_VL_MIN_PIXELS = 65536
QWEN3_VL_MAX_PIXELS = 16777216
MAX_ASPECT_RATIO = 200.0
# Refuse to decode anything larger than PIL's own decompression-bomb threshold.
MAX_INPUT_PIXELS = 178_956_970
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


class ImageError(UserError, ValueError):
    """An image that cannot be used; the message names the record, the image and the problem."""

    def __init__(self, record: str | None, problem: str, image: str | None = None):
        self.record = record
        self.image = image
        self.problem = problem
        where = " ".join(
            ([f"record {record!r}"] if record is not None else []) + ([image] if image is not None else [])
        )
        super().__init__(f"{where}: {problem}" if where else problem)


# PIL names an in-memory file by its repr (``<_io.BytesIO object at 0x7f...>``), which says nothing.
_BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class ImageConfig:
    """Vision preprocessing settings (defaults: Qwen3-VL's released preprocessor)."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = QWEN3_VL_MIN_PIXELS
    max_pixels: int = QWEN3_VL_MAX_PIXELS
    min_side: int = 1  # inputs with a side shorter than this are refused
    max_input_pixels: int = MAX_INPUT_PIXELS

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one ``pixel_values`` row: 3 * T * P * P (1536 for Qwen3-VL)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def num_patches(self, height: int, width: int) -> int:
        """Patch rows an ``height x width`` input becomes (without decoding it)."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return (h // self.patch_size) * (w // self.patch_size)


def smart_resize(
    height: int,
    width: int,
    factor: int = 32,
    min_pixels: int = QWEN3_VL_MIN_PIXELS,
    max_pixels: int = QWEN3_VL_MAX_PIXELS,
) -> tuple[int, int]:
    """Target ``(height, width)``: multiples of ``factor``, area within ``[min_pixels, max_pixels]``,
    aspect ratio kept as closely as possible (Qwen2-VL's rule, unchanged in Qwen3-VL)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO:g}, "
            f"got {max(height, width) / min(height, width):.1f} ({height}x{width})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


ImageInput = Image.Image | bytes | bytearray | np.ndarray | str | os.PathLike


def decode_image(image: ImageInput, *, record: str | None = None, name: str | None = None) -> Image.Image:
    """Open encoded bytes, a path, or an ``[H, W(, C)]`` uint8 array as a loaded PIL image.

    ``record`` and ``name`` (e.g. ``image 0 (/data/a.png)``; a path names itself) go into the
    message of the :class:`ImageError` raised for an image that cannot be decoded.
    """
    if isinstance(image, Image.Image):
        return image
    if name is None and isinstance(image, (str, os.PathLike)):
        name = f"image {os.fspath(image)}"
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageError(record, f"image array must be uint8, got {image.dtype}", name)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ImageError(record, f"image array must be [H, W], [H, W, 3] or [H, W, 4], got {image.shape}", name)
        return Image.fromarray(image)
    try:
        if isinstance(image, (bytes, bytearray)):
            if len(image) == 0:
                raise ImageError(record, "image bytes are empty", name)
            pil = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, os.PathLike)):
            pil = Image.open(image)
        else:
            raise ImageError(record, f"unsupported image type {type(image).__name__}", name)
        if pil.width * pil.height > MAX_INPUT_PIXELS:
            raise ImageError(record, f"image too large to decode: {pil.width}x{pil.height}", name)
        pil.load()
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        detail = _BUFFER_REPR.sub("", str(e)).strip()
        raise ImageError(record, f"undecodable image ({type(e).__name__}: {detail})", name) from e
    return pil


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; transparency is composited onto white (as ``transformers`` does)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """``[H, W, C]`` uint8 -> ``[H, W, 3]`` uint8 with the arithmetic ``transformers`` uses for arrays."""
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=-1)
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return array


def patchify(image: np.ndarray, *, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """``[C, H, W]`` -> ``[(H/P)*(W/P), C*T*P*P]`` rows (same dtype), merge windows contiguous.

    Row order: (merge-row, merge-col, row-in-window, col-in-window); within a row the layout is
    (channel, time, patch-row, patch-col), the single frame repeated ``temporal_patch_size`` times.
    """
    c, h, w = image.shape
    gh, gw = h // patch_size, w // patch_size
    x = image.reshape(c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    return np.ascontiguousarray(x).reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)


def process_image_uint8(
    image: ImageInput,
    *,
    patch_size: int = 16,
    merge_size: int = 2,
    min_pixels: int = QWEN3_VL_MIN_PIXELS,
    max_pixels: int = QWEN3_VL_MAX_PIXELS,
    min_side: int = 1,
    record: str | None = None,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Decode, convert to RGB, ``smart_resize`` and cut into patches, still as bytes:
    ``(patches [num_patches, 3, P*P] uint8 in merge-window order, grid_thw (1, H/P, W/P))``.

    A quarter of the float32 size and no temporal copy yet: the pipeline keeps examples in this
    form and normalises straight into the batch buffer (:func:`normalise_patches`).
    """
    if isinstance(image, np.ndarray):
        decode_image(image, record=record)  # validates dtype and shape, raising with the reason
        rgb = _array_to_rgb(image)
    else:
        rgb = np.asarray(to_rgb(decode_image(image, record=record)))
    height, width = rgb.shape[:2]
    if min(height, width) < min_side:
        raise ImageError(record, f"image too small: {height}x{width}, each side must be >= {min_side} px")
    if height * width > MAX_INPUT_PIXELS:
        raise ImageError(record, f"image too large: {height}x{width}")
    try:
        new_h, new_w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    except ValueError as e:
        raise ImageError(record, str(e)) from e
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    patches = patchify(
        resized.transpose(2, 0, 1), patch_size=patch_size, merge_size=merge_size, temporal_patch_size=1
    )
    return patches.reshape(len(patches), 3, patch_size * patch_size), (
        1,
        new_h // patch_size,
        new_w // patch_size,
    )


def normalise_patches(
    patches: np.ndarray, temporal_patch_size: int = 2, out: np.ndarray | None = None
) -> np.ndarray:
    """``[N, 3, P*P]`` uint8 -> ``[N, 3*T*P*P]`` float32 ``pixel_values`` (written into ``out`` if given).

    Each byte maps through a 256-entry table holding transformers' arithmetic (uint8 -> float64
    * 1/255 -> float32, then (x - mean) / std in float32), so values are bit-identical to it; the
    single frame is repeated ``temporal_patch_size`` times.
    """
    n, c, pp = patches.shape
    if out is None:
        out = np.empty((n, c * temporal_patch_size * pp), np.float32)
    out.reshape(n, c, temporal_patch_size, pp)[:] = np.take(_NORMALISE_LUT, patches)[:, :, None, :]
    return out


def process_image(
    image: ImageInput,
    *,
    patch_size: int = 16,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = QWEN3_VL_MIN_PIXELS,
    max_pixels: int = QWEN3_VL_MAX_PIXELS,
    min_side: int = 1,
    record: str | None = None,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> ``(pixel_values [num_patches, 3*T*P*P] float32, grid_thw (1, H/P, W/P))``.

    ``image`` may be a PIL image, encoded bytes, a path, or a uint8 ``[H, W(, C)]`` array.
    Errors (undecodable, too small, too large, extreme aspect ratio) raise :class:`ImageError`
    naming ``record``.
    """
    patches, grid = process_image_uint8(
        image,
        patch_size=patch_size,
        merge_size=merge_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        min_side=min_side,
        record=record,
    )
    return normalise_patches(patches, temporal_patch_size), grid


def _normalise_table() -> np.ndarray:
    """``[256, ]`` float32: uint8 -> float64 * 1/255 -> float32, then (x - mean) / std in float32
    (transformers' rounding; mean and std are the same for the three channels)."""
    if len(set(IMAGE_MEAN)) != 1 or len(set(IMAGE_STD)) != 1:
        raise ValueError("the lookup-table normalisation needs one mean and one std for all channels")
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.float32(IMAGE_MEAN[0])) / np.float32(IMAGE_STD[0])


_NORMALISE_LUT = _normalise_table()


def process_images_uint8(
    images: Sequence[ImageInput], *, config: ImageConfig | None = None, record: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> ``(patches [sum num_patches, 3, P*P] uint8, image_grid_thw [N, 3] int32)``."""
    cfg = config or ImageConfig()
    rows, grids = [], []
    for i, image in enumerate(images):
        name = record if len(images) == 1 or record is None else f"{record}[image {i}]"
        patches, grid = process_image_uint8(
            image,
            patch_size=cfg.patch_size,
            merge_size=cfg.merge_size,
            min_pixels=cfg.min_pixels,
            max_pixels=cfg.max_pixels,
            min_side=cfg.min_side,
            record=name,
        )
        rows.append(patches)
        grids.append(grid)
    if not rows:
        return np.zeros((0, 3, cfg.patch_size**2), np.uint8), np.zeros((0, 3), np.int32)
    return np.concatenate(rows, axis=0), np.asarray(grids, dtype=np.int32)


def process_images(
    images: Sequence[ImageInput], *, config: ImageConfig | None = None, record: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> ``(pixel_values [sum num_patches, 3*T*P*P] float32, image_grid_thw [N, 3] int32)``."""
    cfg = config or ImageConfig()
    patches, grids = process_images_uint8(images, config=cfg, record=record)
    return normalise_patches(patches, cfg.temporal_patch_size), grids


def pixelate(image: Image.Image, fraction: float = 0.1) -> Image.Image:
    """VA-OPD's detail-removed view: bilinear downsample each side to ``floor(fraction * side)``
    (at least 1 px), then nearest-neighbour upsample back to the original size (RGB out).

    Same size as the input, so the patch grid and visual-token positions do not change.
    """
    rgb = to_rgb(image)
    w, h = rgb.size
    small = rgb.resize(
        (max(1, math.floor(w * fraction)), max(1, math.floor(h * fraction))), Image.Resampling.BILINEAR
    )
    return small.resize((w, h), Image.Resampling.NEAREST)
