"""Data: Qwen3-VL image processing and chat prompts, prompt records, Grain pipelines, and the
procedural chart/table/document generator.

Submodules are imported on use (``from jdelta.data.chat import build_prompt``) so importing
``jdelta.data`` stays cheap; :func:`pixelate` is re-exported for VA-OPD.
"""

from jdelta.data.image_processor import pixelate, process_image, process_images, smart_resize

__all__ = ["pixelate", "process_image", "process_images", "smart_resize"]
