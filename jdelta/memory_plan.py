"""Per-device memory of a distillation run on a ``(data, fsdp, tensor)`` mesh, before any device exists.

:func:`plan` adds up, per device (bytes):

* **student parameters** -- float32 master weights, each variable's *shard* (the logical-axis rules of
  :mod:`jdelta.sharding`, applied to the abstract model from ``jax.eval_shape``: exact, including
  the dimensions that do not divide and stay replicated), plus a ``dtype`` compute copy when
  ``dtype`` is not float32 (the train step casts the masters);
* **optimizer state** -- AdamW's two moments, float32, sharded like the parameters;
* **gradients** -- float32, sharded like the parameters, and the optimizer's update tree (one more
  float32 copy, alive while optax forms the update);
* **teacher parameters** -- in ``dtype``, sharded by the same rules;
* **sampler KV cache** -- ``k, v [layers, B*n, prompt+new, kv_heads, head_dim]`` in ``dtype`` with
  the batch over ``data x fsdp`` and the KV heads over ``tensor`` (each where it divides), plus the
  prompt cache of ``B`` rows that prefill fills before repeating it ``n`` times;
* **teacher scoring activations** -- the forward pass over ``B*n`` rows of ``prompt+new`` tokens, the
  peak of one decoder layer (XLA frees a layer's buffers before the next): the larger of the
  attention phase (residual + normed input ``2H`` + scores and probabilities ``2 x heads/tp x L`` in
  float32) and the MLP phase (``2H + 2 x intermediate/tp``), and the LM-head phase (hidden states
  + one chunk of float32 logits ``[rows, chunk, V/tp]``, two live);
* **student training activations** -- of one micro-batch (``grad_accum``), per layer kept for the
  backward pass: without remat every intermediate of the layer (``4H + q + 2kv + 3 x intermediate/tp``
  in ``dtype`` and the float32 scores/probabilities); ``remat=full`` the layer input only, ``dots``
  also every matmul output, plus one layer recomputed; the teacher's final hidden states the loss
  reads; and the chunked loss (student and teacher logits of one chunk, float32, with their gradient).

The peak is the resident part (student masters, optimizer state, teacher parameters) plus the
largest phase: sampling (KV cache + compute copy), teacher scoring, or the train step (gradients,
update tree, compute copy, activations). Devices' HBM sizes and their sources are in :data:`DEVICES`.

Validated against XLA's compiled memory analysis on an 8-device CPU mesh (``tests/stages/test_plan.py``):
parameters + optimizer + gradients of a train step, the sampler's KV cache, and the scoring
activations (on meshes with ``fsdp = 1``). The activation figures are a model of XLA's buffer reuse,
not a promise: attention implementations that do not materialise scores (cuDNN / splash) need less,
and on meshes with ``fsdp > 1`` XLA's partitioner can lay out a layer's intermediates with the batch
gathered over ``fsdp`` (measured on CPU at tiny shapes: 2.6-5x the figure here). The training
activations are not validated against XLA.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jdelta.errors import UserError

GIB = 1024**3

# name -> (HBM bytes per chip/GPU, source). TPU figures: Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e); GPU figures: NVIDIA's H100 / H200 datasheets.
DEVICES: dict[str, tuple[int, str]] = {
    "v4": (32 * GIB, "Cloud TPU docs, TPU v4: 32 GiB HBM2 per chip"),
    "v5e": (16 * GIB, "Cloud TPU docs, TPU v5e: 16 GiB HBM2 per chip"),
    "v5p": (95 * GIB, "Cloud TPU docs, TPU v5p: 95 GiB HBM2e per chip"),
    "v6e": (32 * GIB, "Cloud TPU docs, TPU v6e (Trillium): 32 GiB HBM per chip"),
    "h100": (80 * 10**9, "NVIDIA H100 SXM datasheet: 80 GB HBM3"),
    "h200": (141 * 10**9, "NVIDIA H200 SXM datasheet: 141 GB HBM3e"),
}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
REMAT_CHOICES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_nothing")
MESH_AXES = ("data", "fsdp", "tensor")

QWEN_SIZES = ("2b", "4b", "8b", "32b")
GEMMA_SIZES = ("4b", "12b", "27b")


class PlanError(UserError):
    """A plan that cannot be made: unknown model or device, a mesh that does not divide the batch."""


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model: its text decoder's shape and its parameters' shards.

    ``variables``: ``(shape, logical axis names)`` of every parameter (``names`` may be None).
    """

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    variables: tuple[tuple[tuple[int, ...], tuple[str | None, ...] | None], ...] = field(repr=False)

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s, _ in self.variables)


def _abstract_model(family_name: str, config: Any) -> Any:
    if family_name == "gemma3":
        from jdelta.models.gemma3.weights import abstract_model
    else:
        from jdelta.models.qwen3_vl.weights import abstract_model
    return abstract_model(config)


def shape_of_config(name: str, config: Any) -> ModelShape:
    """A family's config object -> :class:`ModelShape` (abstract model via ``jax.eval_shape``: no memory)."""
    from flax import nnx

    from jdelta.models.family import family_of_config

    _, state = nnx.split(_abstract_model(family_of_config(config).name, config))
    variables = []
    for _, var in nnx.to_flat_state(state):
        meta = var.get_metadata()
        names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
        variables.append((tuple(var.get_value().shape), tuple(names) if names else None))
    t = config.text
    return ModelShape(name=name, layers=t.num_hidden_layers, hidden=t.hidden_size, intermediate=t.intermediate_size,
                      heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, head_dim=t.head_dim,
                      vocab=t.vocab_size, variables=tuple(variables))


def preset_names() -> list[str]:
    return [f"qwen3-vl-{s}" for s in QWEN_SIZES] + [f"gemma3-{s}" for s in GEMMA_SIZES]


def resolve_model(model: str) -> ModelShape:
    """A preset (``2b`` = ``qwen3-vl-2b`` ..., ``gemma3-12b``), a ``config.json`` or a checkpoint directory."""
    from jdelta.models.family import resolve_config

    try:
        family, path = resolve_config(model)
        config = family.config_class.from_pretrained(path)
    except (FileNotFoundError, ValueError) as e:
        raise PlanError(f"model {model!r}: {e} (presets: {', '.join(preset_names())})") from None
    return shape_of_config(model, config)


# ------------------------------------------------------------------------------------------ sharding


def shard_numel(shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mapping[str, int]) -> int:
    """Elements of one device's shard of an array with these logical axes (jdelta's rules table)."""
    from jdelta.sharding import DEFAULT_RULES

    if not names:
        return math.prod(shape)
    table = dict(DEFAULT_RULES)
    used: set[str] = set()
    n = 1
    for dim, name in zip(shape, names, strict=True):
        target = table.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a not in used and mesh.get(a, 1) > 1)
        split = math.prod(mesh[a] for a in axes) if axes else 1
        if dim % split:
            axes, split = (), 1
        used.update(axes)
        n *= dim // split
    return n


def param_shard_numel(model: ModelShape, mesh: Mapping[str, int]) -> int:
    return sum(shard_numel(s, names, mesh) for s, names in model.variables)


def _split(dim: int, ways: int) -> int:
    """Per-device size of a dimension split ``ways`` ways (replicated when it does not divide)."""
    return dim // ways if ways > 1 and dim % ways == 0 else dim


# ------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class PlanInputs:
    teacher: ModelShape
    student: ModelShape
    mesh: Mapping[str, int]
    batch: int  # prompts per step (global)
    prompt_len: int
    new_tokens: int
    rollouts: int  # samples per prompt
    dtype: str = "bfloat16"
    remat: str = "full"
    chunk_size: int = 512  # positions per chunk of the LM-head loss / scoring
    grad_accum: int = 1  # micro-batches per train step (activations are those of one micro-batch)


@dataclass(frozen=True)
class Plan:
    """Per-device bytes by component (:data:`COMPONENTS` order) and the peak."""

    components: dict[str, int]
    peak: int
    phase: str  # the phase that sets the peak: "sampling", "scoring" or "training"


COMPONENTS = ("student params", "optimizer state", "gradients", "teacher params", "sampler KV cache",
              "teacher scoring activations", "training activations")


def check_inputs(p: PlanInputs) -> None:
    for a in MESH_AXES:
        if p.mesh.get(a, 1) < 1:
            raise PlanError(f"mesh axis {a} must be >= 1, got {p.mesh.get(a)}")
    if p.dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype {p.dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
    if p.remat not in REMAT_CHOICES:
        raise PlanError(f"remat {p.remat!r}: expected one of {', '.join(REMAT_CHOICES)}")
    for name in ("batch", "prompt_len", "new_tokens", "rollouts", "chunk_size", "grad_accum"):
        if getattr(p, name) < 1:
            raise PlanError(f"{name} must be >= 1, got {getattr(p, name)}")
    shards = p.mesh.get("data", 1) * p.mesh.get("fsdp", 1)
    rows = p.batch * p.rollouts
    if p.batch % shards:
        raise PlanError(f"batch {p.batch} prompts does not divide over data x fsdp = {shards} devices "
                        f"(mesh {mesh_str(p.mesh)}); use a batch that is a multiple of {shards}")
    if rows % (shards * p.grad_accum):
        raise PlanError(f"batch x rollouts = {rows} rows do not divide into grad_accum = {p.grad_accum} "
                        f"micro-batches over data x fsdp = {shards} devices")


def mesh_str(mesh: Mapping[str, int]) -> str:
    return "x".join(str(mesh.get(a, 1)) for a in MESH_AXES) + " (data x fsdp x tensor)"


def kv_cache_bytes(model: ModelShape, mesh: Mapping[str, int], rows: int, length: int, dtype_bytes: int) -> int:
    """One device's ``k + v [layers, rows, length, kv_heads, head_dim]`` and ``valid [rows, length]``."""
    shards = mesh.get("data", 1) * mesh.get("fsdp", 1)
    r = _split(rows, shards)
    kvh = _split(model.kv_heads, mesh.get("tensor", 1))
    return 2 * model.layers * r * length * kvh * model.head_dim * dtype_bytes + r * length


def forward_activation_bytes(model: ModelShape, mesh: Mapping[str, int], rows: int, length: int,
                             act_bytes: int, chunk_size: int) -> int:
    """Peak bytes of a forward pass without gradients over ``[rows, length]`` (one device)."""
    tp = mesh.get("tensor", 1)
    r = _split(rows, mesh.get("data", 1) * mesh.get("fsdp", 1))
    tokens = r * length
    h = model.hidden
    heads = _split(model.heads, tp)
    attn = tokens * (2 * h * act_bytes + 2 * heads * length * 4)
    mlp = tokens * (2 * h + 2 * _split(model.intermediate, tp)) * act_bytes
    head = tokens * h * act_bytes + 2 * r * min(chunk_size, length) * _split(model.vocab, tp) * 4
    return max(attn, mlp, head)


def training_activation_bytes(p: PlanInputs) -> int:
    """Student activations kept for (and formed in) the backward pass of one micro-batch, the teacher's
    hidden states the loss reads, and the chunked loss."""
    m, mesh = p.student, p.mesh
    tp = mesh.get("tensor", 1)
    ab = DTYPE_BYTES[p.dtype]
    rows = p.batch * p.rollouts // p.grad_accum
    r = _split(rows, mesh.get("data", 1) * mesh.get("fsdp", 1))
    length = p.prompt_len + p.new_tokens
    tokens = r * length
    h, inter = m.hidden, _split(m.intermediate, tp)
    q, kv = _split(m.heads, tp) * m.head_dim, _split(m.kv_heads, tp) * m.head_dim
    scores = 2 * _split(m.heads, tp) * length * 4
    per_layer_all = tokens * ((4 * h + q + 2 * kv + 3 * inter) * ab + scores)
    if p.remat == "none":
        kept = m.layers * per_layer_all
    elif p.remat in ("dots", "dots_with_no_batch_dims"):  # layer input + every matmul output kept
        kept = m.layers * tokens * (2 * h + q + 2 * kv + 2 * inter) * ab + per_layer_all
    else:  # full / save_nothing: the layer inputs are kept; one layer is recomputed at a time
        kept = m.layers * tokens * h * ab + per_layer_all
    vocab = _split(m.vocab, tp)
    loss = 4 * r * min(p.chunk_size, length) * vocab * 4  # both models' chunk logits + their gradients
    teacher_hidden = tokens * p.teacher.hidden * ab
    return kept + loss + tokens * h * 4 + teacher_hidden  # + the float32 hidden-state gradient of the loss


def plan(p: PlanInputs) -> Plan:
    check_inputs(p)
    ab = DTYPE_BYTES[p.dtype]
    mesh = p.mesh
    s_numel = param_shard_numel(p.student, mesh)
    t_numel = param_shard_numel(p.teacher, mesh)
    compute_copy = s_numel * ab if p.dtype != "float32" else 0
    rows = p.batch * p.rollouts
    length = p.prompt_len + p.new_tokens
    kv = kv_cache_bytes(p.student, mesh, rows, length, ab)
    if p.rollouts > 1:  # prefill's prompt cache (B rows) is alive while it is repeated n times
        kv += kv_cache_bytes(p.student, mesh, p.batch, length, ab)
    comp = {
        "student params": s_numel * 4 + compute_copy,
        "optimizer state": 2 * s_numel * 4,
        "gradients": 2 * s_numel * 4,  # gradients + optax's update tree
        "teacher params": t_numel * ab,
        "sampler KV cache": kv,
        "teacher scoring activations": forward_activation_bytes(p.teacher, mesh, rows, length, ab, p.chunk_size),
        "training activations": training_activation_bytes(p),
    }
    resident = s_numel * 4 + comp["optimizer state"] + comp["teacher params"]
    phases = {
        "sampling": compute_copy + kv,
        "scoring": comp["teacher scoring activations"],
        "training": compute_copy + comp["gradients"] + comp["training activations"],
    }
    phase = max(phases, key=phases.__getitem__)
    return Plan(components=comp, peak=resident + phases[phase], phase=phase)


def device_bytes(device: str) -> tuple[int, str]:
    """``(HBM bytes per chip, source)`` of a device kind or a TPU slice name (``v5p-64``)."""
    kind, _ = parse_device(device)
    return DEVICES[kind]


# TPU slice names count TensorCores on v4 / v5p (2 per chip) and chips on v5e / v6e (Cloud TPU docs).
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


def parse_device(device: str) -> tuple[str, int | None]:
    """``"v5p"`` -> ``("v5p", None)``; a slice ``"v5p-64"`` -> ``("v5p", 32)`` (chips); ``v5litepod-16`` = v5e."""
    key = device.lower().replace("v5litepod", "v5e")
    kind, _, size = key.partition("-")
    if kind not in DEVICES or (size and (kind not in _CORES_PER_CHIP or not size.isdigit())):
        raise PlanError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)} "
                        "or a TPU slice such as v5p-64, v4-32, v5litepod-16, v6e-16")
    if not size:
        return kind, None
    cores = int(size)
    if cores < 1 or cores % _CORES_PER_CHIP[kind]:
        raise PlanError(f"TPU slice {device!r}: {cores} is not a whole number of {kind} chips")
    return kind, cores // _CORES_PER_CHIP[kind]


def meshes(num_devices: int, max_tensor: int = 8) -> Iterator[dict[str, int]]:
    """Every ``data x fsdp x tensor = num_devices`` with ``tensor <= max_tensor`` (one host's chips)."""
    for tensor in range(1, min(num_devices, max_tensor) + 1):
        if num_devices % tensor:
            continue
        rest = num_devices // tensor
        for fsdp in range(1, rest + 1):
            if rest % fsdp == 0:
                yield {"data": rest // fsdp, "fsdp": fsdp, "tensor": tensor}


def choose_mesh(p: PlanInputs, num_devices: int, capacity: int) -> tuple[dict[str, int], Plan] | None:
    """The mesh to use on ``num_devices``: among those whose peak fits ``capacity`` and divide the
    batch, the least tensor parallelism, then the least FSDP (less communication per step); None when
    none fits."""
    best = None
    for mesh in meshes(num_devices):
        q = PlanInputs(**{**p.__dict__, "mesh": mesh})
        try:
            result = plan(q)
        except PlanError:
            continue
        if result.peak > capacity:
            continue
        key = (mesh["tensor"], mesh["fsdp"])
        if best is None or key < best[0]:
            best = (key, mesh, result)
    return None if best is None else (best[1], best[2])


def format_bytes(n: int) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:8.1f} MiB"
