"""Gemma 3 image preprocessing in NumPy/PIL, with optional pan-and-scan.

Same arithmetic as ``transformers``' ``Gemma3ImageProcessorPil`` with the released
``preprocessor_config.json`` (896 x 896, bilinear, rescale 1/255, mean = std = 0.5): RGB
conversion (transparency composited onto white), a PIL bilinear resize of the uint8 image to
the square size, ``x * (1/255)`` in float64 cast to float32, then ``(x - 0.5) / 0.5`` -> channel-first.

Pan-and-scan (off by default, as in the processor): an image whose aspect ratio reaches
``min_ratio_to_activate`` is also cut into 2..``max_num_crops`` equal crops along its long side
(each at least ``min_crop_size`` px); the crops follow the whole image, each resized like it,
and the prompt gets one image sequence per crop (:mod:`jdelta.models.gemma3.chat`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from jdelta.data.image_processor import ImageInput, decode_image, to_rgb


@dataclass(frozen=True)
class Gemma3ImageConfig:
    """The image processor's settings (``preprocessor_config.json`` keys in brackets)."""

    size: int = 896  # [size.height == size.width]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # [image_mean]
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # [image_std]
    rescale_factor: float = 1 / 255  # [rescale_factor]
    pan_and_scan: bool = False  # [do_pan_and_scan]
    min_crop_size: int = 256  # [pan_and_scan_min_crop_size]
    max_num_crops: int = 4  # [pan_and_scan_max_num_crops]
    min_ratio_to_activate: float = 1.2  # [pan_and_scan_min_ratio_to_activate]

    @classmethod
    def from_preprocessor_config(cls, d: dict[str, Any], **overrides: Any) -> Gemma3ImageConfig:
        """From a parsed ``preprocessor_config.json``; null entries keep the defaults."""
        size = d.get("size") or {}
        if size and size.get("height") != size.get("width"):
            raise ValueError(f"preprocessor_config.json: size {size} is not square")
        if d.get("resample", 2) != 2:
            raise ValueError(f"preprocessor_config.json: resample={d['resample']}; only bilinear (2) is supported")
        fields = dict(size=size.get("height"), mean=d.get("image_mean"), std=d.get("image_std"),
                      rescale_factor=d.get("rescale_factor"), pan_and_scan=d.get("do_pan_and_scan"),
                      min_crop_size=d.get("pan_and_scan_min_crop_size"), max_num_crops=d.get("pan_and_scan_max_num_crops"),
                      min_ratio_to_activate=d.get("pan_and_scan_min_ratio_to_activate"))
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items() if v is not None}
        return cls(**{**kw, **overrides})


def pan_and_scan_boxes(height: int, width: int, cfg: Gemma3ImageConfig) -> list[tuple[int, int, int, int]]:
    """Crops ``(top, left, crop_height, crop_width)`` of an ``height x width`` image; ``[]`` when the
    image is not elongated enough or the crops would be smaller than ``min_crop_size``."""
    if width >= height:
        if width / height < cfg.min_ratio_to_activate:
            return []
        n_w = min(int(math.floor(width / cfg.min_crop_size)), int(math.floor(width / height + 0.5)))
        n_w, n_h = min(cfg.max_num_crops, max(2, n_w)), 1
    else:
        if height / width < cfg.min_ratio_to_activate:
            return []
        n_h = min(int(math.floor(height / cfg.min_crop_size)), int(math.floor(height / width + 0.5)))
        n_h, n_w = min(cfg.max_num_crops, max(2, n_h)), 1
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < cfg.min_crop_size:
        return []
    return [(top, left, crop_h, crop_w)
            for top, left in itertools.product([crop_h * i for i in range(n_h)], [crop_w * i for i in range(n_w)])]


def _resize_normalise(rgb: np.ndarray, cfg: Gemma3ImageConfig) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[3, size, size]`` float32."""
    resized = np.asarray(Image.fromarray(rgb).resize((cfg.size, cfg.size), resample=Image.BILINEAR))
    x = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def process_image(image: ImageInput, cfg: Gemma3ImageConfig | None = None, *, record: str | None = None,
                  name: str | None = None) -> tuple[np.ndarray, int]:
    """One image -> ``(pixel_values [1 + crops, 3, size, size] float32, crops)``; the whole image
    first, then its pan-and-scan crops (none unless ``cfg.pan_and_scan``)."""
    cfg = cfg or Gemma3ImageConfig()
    rgb = np.asarray(to_rgb(decode_image(image, record=record, name=name)))
    boxes = pan_and_scan_boxes(*rgb.shape[:2], cfg) if cfg.pan_and_scan else []
    views = [rgb] + [rgb[t:t + h, left:left + w] for t, left, h, w in boxes]
    return np.stack([_resize_normalise(v, cfg) for v in views]), len(boxes)


def process_images(images: Sequence[ImageInput], cfg: Gemma3ImageConfig | None = None, *,
                   record: str | None = None) -> tuple[np.ndarray, list[int]]:
    """Images in order -> ``(pixel_values [N, 3, size, size], crops per image)``; ``N`` counts
    every image and crop (the order the prompt's image sequences must follow)."""
    cfg = cfg or Gemma3ImageConfig()
    arrays, crops = [], []
    for i, image in enumerate(images):
        pv, n = process_image(image, cfg, record=record, name=f"image {i}")
        arrays.append(pv)
        crops.append(n)
    if not arrays:
        return np.zeros((0, 3, cfg.size, cfg.size), np.float32), []
    return np.concatenate(arrays), crops
