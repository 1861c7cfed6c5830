"""Gemma 3 (vision-language) configuration, read from and written back to HF ``config.json``.

The HF file nests ``text_config`` (``gemma3_text``) and ``vision_config`` (``siglip_vision_model``).
Released checkpoints omit most text fields (they take ``Gemma3TextConfig``'s defaults, repeated
here) and give rotary settings the transformers-4 way (``rope_theta`` for global layers,
``rope_local_base_freq`` for sliding ones, ``rope_scaling`` for the global layers only);
transformers 5 writes ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``.
Both are read; the export writes the transformers-5 form. Keys jdelta does not use are kept in
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
LAYER_TYPES = ("sliding_attention", "full_attention")
ROPE_TYPES = ("default", "linear")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary settings of one layer type: ``inv_freq = 1 / theta^(2i/d) / factor`` (``linear``
    scaling divides the frequencies by ``factor``; ``default`` has factor 1)."""

    theta: float
    factor: float = 1.0

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None, default_theta: float, where: str) -> RopeSpec:
        d = dict(d or {})
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (only {', '.join(ROPE_TYPES)})")
        factor = float(d.get("factor", 1.0)) if rope_type == "linear" else 1.0
        return cls(theta=float(d.get("rope_theta", default_theta)), factor=factor)

    def to_hf(self) -> dict[str, Any]:
        if self.factor != 1.0:
            return {"rope_type": "linear", "rope_theta": self.theta, "factor": self.factor}
        return {"rope_type": "default", "rope_theta": self.theta}


@dataclass(frozen=True)
class Gemma3TextConfig:
    """The Gemma 3 decoder. Defaults are transformers' ``Gemma3TextConfig`` defaults.

    ``final_logit_softcapping`` (None in the released checkpoints) caps the logits as
    transformers' ``Gemma3ForCausalLM`` does (its ``Gemma3ForConditionalGeneration`` ignores it).
    ``attn_logit_softcapping`` stays in ``extra``: transformers' Gemma 3 never applies it.
    """

    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131_072
    query_pre_attn_scalar: int | float = 256  # transformers' config wants an int when it is whole
    sliding_window: int = 4096
    layer_types: tuple[str, ...] = ()
    rope_global: RopeSpec = RopeSpec(1_000_000.0)
    rope_local: RopeSpec = RopeSpec(10_000.0)
    final_logit_softcapping: float | None = None
    attention_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    _KNOWN = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_activation", "hidden_act", "rms_norm_eps",
              "max_position_embeddings", "query_pre_attn_scalar", "sliding_window", "layer_types",
              "sliding_window_pattern", "_sliding_window_pattern", "rope_parameters", "rope_scaling", "rope_theta",
              "rope_local_base_freq", "final_logit_softcapping", "attention_bias",
              "use_bidirectional_attention", "model_type", "tie_word_embeddings")

    def __post_init__(self):
        if not self.layer_types:  # transformers' default pattern: every 6th layer global
            object.__setattr__(self, "layer_types", tuple(
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Gemma3TextConfig:
        if d.get("use_bidirectional_attention"):
            raise ValueError("text_config.use_bidirectional_attention=true (an embedding model) is not supported")
        layers = int(d.get("num_hidden_layers", cls.num_hidden_layers))
        layer_types = d.get("layer_types")
        if layer_types is None:
            pattern = int(d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6)))
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
        rope = d.get("rope_parameters") or {}
        if rope and not set(rope) <= set(LAYER_TYPES):  # a flat dict: the global layers' settings
            rope = {"full_attention": rope}
        full = dict(rope.get("full_attention") or {})
        for key, value in (d.get("rope_scaling") or {}).items():
            full.setdefault(key, value)
        if "rope_theta" in d:
            full.setdefault("rope_theta", d["rope_theta"])
        local = dict(rope.get("sliding_attention") or {})
        if "rope_local_base_freq" in d:
            local.setdefault("rope_theta", d["rope_local_base_freq"])
        heads = int(d.get("num_attention_heads", cls.num_attention_heads))
        cfg = cls(
            vocab_size=int(d.get("vocab_size", cls.vocab_size)),
            hidden_size=int(d.get("hidden_size", cls.hidden_size)),
            intermediate_size=int(d.get("intermediate_size", cls.intermediate_size)),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or cls.head_dim),
            hidden_activation=d.get("hidden_activation") or d.get("hidden_act") or cls.hidden_activation,
            rms_norm_eps=float(d.get("rms_norm_eps", cls.rms_norm_eps)),
            max_position_embeddings=int(d.get("max_position_embeddings", cls.max_position_embeddings)),
            query_pre_attn_scalar=_int_if_whole(d.get("query_pre_attn_scalar", cls.query_pre_attn_scalar)),
            sliding_window=int(d.get("sliding_window") or cls.sliding_window),
            layer_types=tuple(layer_types),
            rope_global=RopeSpec.from_hf(full, 1_000_000.0, "text_config.rope_parameters.full_attention"),
            rope_local=RopeSpec.from_hf(local, 10_000.0, "text_config.rope_parameters.sliding_attention"),
            final_logit_softcapping=_opt_float(d.get("final_logit_softcapping")),
            attention_bias=bool(d.get("attention_bias", False)),
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"text_config.hidden_activation={self.hidden_activation!r}: expected gelu_pytorch_tanh")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"text_config: num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"text_config.layer_types has {len(self.layer_types)} entries for "
                             f"num_hidden_layers={self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"text_config.layer_types: unknown {bad}; expected {' or '.join(LAYER_TYPES)}")
        if self.sliding_window < 1:
            raise ValueError(f"text_config.sliding_window={self.sliding_window} must be positive")

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        """Per layer: True for a local sliding-window layer, False for a global one."""
        return tuple(t == "sliding_attention" for t in self.layer_types)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            model_type="gemma3_text", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, hidden_activation=self.hidden_activation, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, query_pre_attn_scalar=self.query_pre_attn_scalar,
            sliding_window=self.sliding_window, layer_types=list(self.layer_types),
            rope_parameters={"full_attention": self.rope_global.to_hf(),
                             "sliding_attention": self.rope_local.to_hf()},
            final_logit_softcapping=self.final_logit_softcapping, attention_bias=self.attention_bias,
        )
        return d


def _int_if_whole(x) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _opt_float(x) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True)
class SiglipVisionConfig:
    """The SigLIP vision tower (no pooling head). Defaults are the Gemma 3 tower (So400m/14 at
    896 px); ``from_hf_dict`` fills keys missing from a file with transformers' ``SiglipVisionConfig``
    defaults, as transformers does."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 896
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    _KNOWN = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
              "image_size", "patch_size", "hidden_act", "layer_norm_eps", "vision_use_head", "model_type")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> SiglipVisionConfig:
        if d.get("vision_use_head", False):
            raise ValueError("vision_config.vision_use_head=true: Gemma 3's SigLIP tower has no pooling head")
        cfg = cls(
            hidden_size=int(d.get("hidden_size", 768)),
            intermediate_size=int(d.get("intermediate_size", 3072)),
            num_hidden_layers=int(d.get("num_hidden_layers", 12)),
            num_attention_heads=int(d.get("num_attention_heads", 12)),
            num_channels=int(d.get("num_channels", 3)),
            image_size=_side(d.get("image_size", 224), "image_size"),
            patch_size=_side(d.get("patch_size", 16), "patch_size"),
            hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"vision_config.hidden_act={self.hidden_act!r}: expected gelu_pytorch_tanh or gelu")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision_config: hidden_size={self.hidden_size} not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_config: image_size={self.image_size} not divisible by patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * ps * ps (channel-major, as the Conv2d weight)."""
        return self.num_channels * self.patch_size * self.patch_size

    def to_hf_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            model_type="siglip_vision_model", hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_channels=self.num_channels, image_size=self.image_size, patch_size=self.patch_size,
            hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps, vision_use_head=False,
        )
        return d


def _side(x, name: str) -> int:
    if isinstance(x, list | tuple):
        if len(set(x)) != 1:
            raise ValueError(f"vision_config.{name}={x}: only square sizes are supported")
        x = x[0]
    return int(x)


@dataclass(frozen=True)
class Gemma3Config:
    """Whole-model config: HF fields plus jdelta runtime fields.

    jdelta-side fields (not in HF's file): ``dtype`` (compute dtype), ``param_dtype``,
    ``attention_impl`` ("xla" | "cudnn" | "auto"; used where no attention soft-capping is
    configured), ``remat_policy`` (one of ``REMAT_POLICIES``; decoder layers, no KV cache).
    """

    text: Gemma3TextConfig = field(default_factory=Gemma3TextConfig)
    vision: SiglipVisionConfig = field(default_factory=SiglipVisionConfig)
    mm_tokens_per_image: int = 256
    image_token_id: int = 262_144
    boi_token_id: int = 255_999
    eoi_token_id: int = 256_000
    tie_word_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    remat_policy: str = "none"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    _KNOWN = ("text_config", "vision_config", "mm_tokens_per_image", "image_token_index", "image_token_id",
              "boi_token_index", "boi_token_id", "eoi_token_index", "eoi_token_id", "tie_word_embeddings",
              "model_type", "architectures", "dtype", "torch_dtype", "transformers_version")

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        side = int(round(self.mm_tokens_per_image ** 0.5))
        if side * side != self.mm_tokens_per_image or self.vision.patches_per_side % side:
            raise ValueError(f"mm_tokens_per_image={self.mm_tokens_per_image} must be a square whose side divides "
                             f"the {self.vision.patches_per_side} patches per image side")

    @property
    def tokens_per_side(self) -> int:
        return int(round(self.mm_tokens_per_image ** 0.5))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> Gemma3Config:
        """Build from the parsed HF ``config.json``; ``overrides`` set jdelta fields (dtype, ...)."""
        if d.get("model_type", "gemma3") != "gemma3":
            raise ValueError(f"model_type={d.get('model_type')!r}: expected 'gemma3' (Gemma3ForConditionalGeneration)")
        text_d = d.get("text_config") or {}
        tie = d.get("tie_word_embeddings", text_d.get("tie_word_embeddings", True))

        def first(*keys, default):
            return next((d[k] for k in keys if d.get(k) is not None), default)

        return cls(
            text=Gemma3TextConfig.from_hf_dict(text_d),
            vision=SiglipVisionConfig.from_hf_dict(d.get("vision_config") or {}),
            mm_tokens_per_image=int(d.get("mm_tokens_per_image") or 256),
            image_token_id=int(first("image_token_index", "image_token_id", default=262_144)),
            boi_token_id=int(first("boi_token_index", "boi_token_id", default=255_999)),
            eoi_token_id=int(first("eoi_token_index", "eoi_token_id", default=256_000)),
            tie_word_embeddings=bool(tie),
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
            **overrides,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> Gemma3Config:
        """Read ``<path>/config.json`` (or ``path`` itself if it is a file)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no Gemma 3 config at {file}")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e
        try:
            return cls.from_hf_dict(d, **overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{file}: {e}") from e

    def replace(self, **changes: Any) -> Gemma3Config:
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        text = self.text.to_hf_dict()
        text["tie_word_embeddings"] = self.tie_word_embeddings
        d.update(
            architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3",
            text_config=text, vision_config=self.vision.to_hf_dict(), mm_tokens_per_image=self.mm_tokens_per_image,
            image_token_index=self.image_token_id, boi_token_index=self.boi_token_id,
            eoi_token_index=self.eoi_token_id, tie_word_embeddings=self.tie_word_embeddings, dtype=self.param_dtype,
        )
        return d
