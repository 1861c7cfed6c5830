"""Qwen3-VL configuration, read from and written back to HF ``config.json``.

The HF file nests ``text_config`` and ``vision_config``; rotary settings come either as
``rope_parameters`` (transformers >= 5) or as ``rope_theta`` + ``rope_scaling``
(checkpoints published with transformers 4.57). Keys jdelta does not use are kept in
``extra`` so an export writes them back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTENTION_IMPLS = ("xla", "cudnn", "auto")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_nothing")


def _rope_params(d: dict[str, Any], where: str, default_theta: float) -> dict[str, Any]:
    rope = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    for key, value in scaling.items():
        rope.setdefault(key, value)
    if "rope_theta" in d and "rope_theta" not in rope:
        rope["rope_theta"] = d["rope_theta"]
    rope.setdefault("rope_theta", default_theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "axial"):
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (only 'default'/'axial')")
    return rope


@dataclass(frozen=True)
class Qwen3VLTextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    mrope_interleaved: bool = True
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    _KNOWN = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
              "attention_bias", "rope_parameters", "rope_scaling", "rope_theta", "model_type")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Qwen3VLTextConfig:
        rope = _rope_params(d, "text_config", 5_000_000.0)
        heads = int(d.get("num_attention_heads", cls.num_attention_heads))
        hidden = int(d.get("hidden_size", cls.hidden_size))
        kv = d.get("num_key_value_heads") or heads
        cfg = cls(
            vocab_size=int(d.get("vocab_size", cls.vocab_size)),
            hidden_size=hidden,
            intermediate_size=int(d.get("intermediate_size", cls.intermediate_size)),
            num_hidden_layers=int(d.get("num_hidden_layers", cls.num_hidden_layers)),
            num_attention_heads=heads,
            num_key_value_heads=int(kv),
            head_dim=int(d.get("head_dim") or hidden // heads),
            hidden_act=d.get("hidden_act", "silu"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope["rope_theta"]),
            mrope_section=tuple(int(x) for x in rope.get("mrope_section", (24, 20, 20))),
            mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
            max_position_embeddings=int(d.get("max_position_embeddings", cls.max_position_embeddings)),
            attention_bias=bool(d.get("attention_bias", False)),
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"text_config.hidden_act={self.hidden_act!r}: only 'silu' is supported")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"text_config: num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"text_config: mrope_section={self.mrope_section} must have 3 entries summing to "
                             f"head_dim/2={self.head_dim // 2}")
        if not self.mrope_interleaved:
            raise ValueError("text_config: Qwen3-VL uses interleaved M-RoPE; mrope_interleaved=false is not supported")

    def to_hf_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            model_type="qwen3_vl_text", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, hidden_act=self.hidden_act, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, attention_bias=self.attention_bias,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                             "mrope_section": list(self.mrope_section), "mrope_interleaved": self.mrope_interleaved},
        )
        return d


@dataclass(frozen=True)
class Qwen3VLVisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    _KNOWN = ("depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels",
              "patch_size", "spatial_merge_size", "temporal_patch_size", "out_hidden_size",
              "num_position_embeddings", "deepstack_visual_indexes", "rope_parameters", "rope_theta",
              "model_type", "num_hidden_layers", "num_attention_heads")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Qwen3VLVisionConfig:
        rope = _rope_params(d, "vision_config", 10000.0)
        cfg = cls(
            depth=int(d.get("depth", d.get("num_hidden_layers", cls.depth))),
            hidden_size=int(d.get("hidden_size", cls.hidden_size)),
            hidden_act=d.get("hidden_act", cls.hidden_act),
            intermediate_size=int(d.get("intermediate_size", cls.intermediate_size)),
            num_heads=int(d.get("num_heads", d.get("num_attention_heads", cls.num_heads))),
            in_channels=int(d.get("in_channels", 3)),
            patch_size=int(d.get("patch_size", 16)),
            spatial_merge_size=int(d.get("spatial_merge_size", 2)),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            out_hidden_size=int(d.get("out_hidden_size", cls.out_hidden_size)),
            num_position_embeddings=int(d.get("num_position_embeddings", cls.num_position_embeddings)),
            deepstack_visual_indexes=tuple(int(i) for i in d.get("deepstack_visual_indexes", (8, 16, 24))),
            rope_theta=float(rope["rope_theta"]),
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"vision_config.hidden_act={self.hidden_act!r}: expected gelu_pytorch_tanh or gelu")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision_config: hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        side = int(round(self.num_position_embeddings ** 0.5))
        if side * side != self.num_position_embeddings:
            raise ValueError(f"vision_config.num_position_embeddings={self.num_position_embeddings} is not a square")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision_config.deepstack_visual_indexes {bad} out of range for depth={self.depth}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of ``pixel_values``: C * T * ps * ps."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    def to_hf_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            model_type="qwen3_vl_vision", depth=self.depth, hidden_size=self.hidden_size,
            hidden_act=self.hidden_act, intermediate_size=self.intermediate_size, num_heads=self.num_heads,
            in_channels=self.in_channels, patch_size=self.patch_size, spatial_merge_size=self.spatial_merge_size,
            temporal_patch_size=self.temporal_patch_size, out_hidden_size=self.out_hidden_size,
            num_position_embeddings=self.num_position_embeddings,
            deepstack_visual_indexes=list(self.deepstack_visual_indexes),
            rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta},
        )
        return d


@dataclass(frozen=True)
class Qwen3VLConfig:
    """Whole-model config: HF fields plus jdelta runtime fields.

    jdelta-side fields (not in HF's file): ``dtype`` (compute dtype), ``param_dtype``,
    ``attention_impl`` ("xla" | "cudnn" | "auto", passed to ``jax.nn.dot_product_attention``),
    ``remat_policy`` (one of ``REMAT_POLICIES``; applied to decoder layers when no KV cache is used),
    ``vision_max_frame_patches`` (None: vision attention with a dense ``[P, P]`` block-diagonal
    mask over all patches of the batch; an int L >= the largest image's ``h*w``: block-local
    attention costing ``P * 3L`` -- use it when a batch holds many images).
    """

    text: Qwen3VLTextConfig = field(default_factory=Qwen3VLTextConfig)
    vision: Qwen3VLVisionConfig = field(default_factory=Qwen3VLVisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    remat_policy: str = "none"
    vision_max_frame_patches: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    _KNOWN = ("text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
              "vision_end_token_id", "tie_word_embeddings", "model_type", "architectures", "dtype",
              "torch_dtype", "transformers_version")

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.vision_max_frame_patches is not None and self.vision_max_frame_patches < 1:
            raise ValueError(f"vision_max_frame_patches={self.vision_max_frame_patches} must be positive or None")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> Qwen3VLConfig:
        """Build from the parsed HF ``config.json``; ``overrides`` set jdelta fields (dtype, ...)."""
        if d.get("model_type", "qwen3_vl") != "qwen3_vl":
            raise ValueError(f"model_type={d.get('model_type')!r}: expected 'qwen3_vl' (dense Qwen3-VL)")
        text_d = d.get("text_config") or {}
        tie = d.get("tie_word_embeddings", text_d.get("tie_word_embeddings", False))
        return cls(
            text=Qwen3VLTextConfig.from_hf_dict(text_d),
            vision=Qwen3VLVisionConfig.from_hf_dict(d.get("vision_config") or {}),
            image_token_id=int(d.get("image_token_id", 151655)),
            video_token_id=int(d.get("video_token_id", 151656)),
            vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
            tie_word_embeddings=bool(tie),
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
            **overrides,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> Qwen3VLConfig:
        """Read ``<path>/config.json`` (or ``path`` itself if it is a file)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no Qwen3-VL config at {file}")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e
        try:
            return cls.from_hf_dict(d, **overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{file}: {e}") from e

    def replace(self, **changes: Any) -> Qwen3VLConfig:
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        text = self.text.to_hf_dict()
        text["tie_word_embeddings"] = self.tie_word_embeddings
        d.update(
            architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl",
            text_config=text, vision_config=self.vision.to_hf_dict(),
            image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id, vision_end_token_id=self.vision_end_token_id,
            tie_word_embeddings=self.tie_word_embeddings, dtype=self.param_dtype,
        )
        return d
