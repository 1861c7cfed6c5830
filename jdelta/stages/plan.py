"""Per-device memory of a distillation run (parameters, optimizer, gradients, KV cache, activations) on a mesh, and whether it fits a device.

``teacher`` / ``student``: a preset (2b, 4b, 8b, 32b = Qwen3-VL; gemma3-4b, gemma3-12b, gemma3-27b), a
config.json or a checkpoint directory. ``mesh``: data x fsdp x tensor (``--mesh fsdp=8,tensor=4``).
``device`` (v4, v5e, v5p, v6e, h100, h200) says whether the peak fits its HBM (``usable_fraction`` of
it); with ``devices`` (the chip count of the slice or cluster), or a TPU slice name as the device
(``v5p-64`` = 32 chips, ``v4-32`` = 16, ``v5litepod-16`` / ``v6e-16`` = 16), it also names the mesh to choose.
``batch`` prompts per step, ``prompt_len`` + ``new_tokens`` tokens per row, ``rollouts`` samples per
prompt, ``grad_accum`` micro-batches per train step, ``remat`` (none, full, dots, ...) the student's
decoder-layer rematerialisation. No weights are read and no device is used: see :mod:`jdelta.memory_plan` for the model.
"""

from __future__ import annotations

import dataclasses
import json
import math

from jdelta.config import MeshConfig, check
from jdelta.memory_plan import (
    COMPONENTS,
    DEVICES,
    MESH_AXES,
    PlanError,
    PlanInputs,
    choose_mesh,
    device_bytes,
    format_bytes,
    mesh_str,
    parse_device,
    plan,
    resolve_model,
)


@dataclasses.dataclass(frozen=True)
class Config:
    """teacher, student: presets or config paths. device: one of v4, v5e, v5p, v6e, h100, h200.
    devices: chips in the slice/cluster (the mesh's product; -1 in mesh takes the rest)."""

    teacher: str = "8b"
    student: str = "2b"
    mesh: MeshConfig = MeshConfig()
    devices: int | None = None
    device: str | None = None
    batch: int = 8
    prompt_len: int = 1024
    new_tokens: int = 512
    rollouts: int = 4
    dtype: str = "bfloat16"
    remat: str = "full"
    chunk_size: int = 512
    grad_accum: int = 1
    usable_fraction: float = 0.9
    json: bool = False

    def __post_init__(self):
        check(self.devices is None or self.devices >= 1, "devices", f"must be >= 1, got {self.devices}")
        check(0 < self.usable_fraction <= 1, "usable_fraction", f"must be in (0, 1], got {self.usable_fraction}")


def resolve_mesh(mesh: MeshConfig, devices: int | None) -> dict[str, int]:
    shape = mesh.shape()
    if -1 in shape.values():
        if devices is None:
            raise PlanError("a mesh axis of -1 needs devices=N (the chip count) to fill it")
        known = math.prod(v for v in shape.values() if v != -1)
        if devices % known:
            raise PlanError(f"{devices} devices do not divide into mesh {shape} (the other axes multiply to {known})")
        shape = {a: (devices // known if v == -1 else v) for a, v in shape.items()}
    if devices is not None and math.prod(shape.values()) != devices and not mesh.is_single_device:
        raise PlanError(f"mesh {mesh_str(shape)} has {math.prod(shape.values())} devices, not devices={devices}")
    return shape


def run(cfg: Config) -> int:
    devices = cfg.devices
    if cfg.device is not None:  # an unknown device is refused before any model work
        kind, chips = parse_device(cfg.device)
        capacity, source = device_bytes(kind)
        if chips is not None and devices is not None and chips != devices:
            raise PlanError(f"device {cfg.device} has {chips} chips, not devices={devices}")
        devices = chips if chips is not None else devices
        cfg = dataclasses.replace(cfg, devices=devices)
    mesh = resolve_mesh(cfg.mesh, cfg.devices)
    inputs = PlanInputs(teacher=resolve_model(cfg.teacher), student=resolve_model(cfg.student), mesh=mesh,
                        batch=cfg.batch, prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens, rollouts=cfg.rollouts,
                        dtype=cfg.dtype, remat=cfg.remat, chunk_size=cfg.chunk_size,
                        grad_accum=cfg.grad_accum)
    explicit_mesh = cfg.devices is None or not cfg.mesh.is_single_device
    result = plan(inputs) if explicit_mesh else None
    out: dict = {"teacher": cfg.teacher, "student": cfg.student,
                 "teacher_params": inputs.teacher.num_params, "student_params": inputs.student.num_params}
    lines = [f"teacher {cfg.teacher} ({inputs.teacher.num_params / 1e9:.2f}B params), student {cfg.student} "
             f"({inputs.student.num_params / 1e9:.2f}B); batch {cfg.batch} x {cfg.rollouts} rollouts, "
             f"{cfg.prompt_len} + {cfg.new_tokens} tokens, {cfg.dtype}, remat {cfg.remat}"]
    if result is not None:
        lines += table(mesh, result)
        out.update(mesh=mesh, components=result.components, peak=result.peak, phase=result.phase)
    if cfg.device is not None:
        usable = int(capacity * cfg.usable_fraction)
        out.update(device=kind, device_bytes=capacity, device_source=source, usable_bytes=usable)
        lines.append(f"device {kind}: {format_bytes(capacity).strip()} per chip ({source}); "
                     f"usable {cfg.usable_fraction:.0%} = {format_bytes(usable).strip()}")
        if result is not None:
            fits = result.peak <= usable
            out["fits"] = fits
            lines.append(f"fits: {'yes' if fits else 'NO'} (peak {format_bytes(result.peak).strip()})")
        if cfg.devices is not None:
            best = choose_mesh(inputs, cfg.devices, usable)
            if best is None:
                out["recommended_mesh"] = None
                lines.append(f"no data x fsdp x tensor mesh of {cfg.devices} {kind} chips fits "
                             "(tensor <= 8): use more chips, a smaller batch or rollouts, or remat")
            else:
                bmesh, bplan = best
                out["recommended_mesh"] = bmesh
                flags = ",".join(f"{a}={bmesh[a]}" for a in MESH_AXES)
                lines.append(f"choose mesh {mesh_str(bmesh)}: peak {format_bytes(bplan.peak).strip()} "
                             f"(least tensor, then least fsdp parallelism that fits); --mesh {flags}")
                if result is None:
                    lines += table(bmesh, bplan)
    print(json.dumps(out) if cfg.json else "\n".join(lines))
    return 0


def table(mesh: dict[str, int], result) -> list[str]:
    lines = [f"per-device memory on mesh {mesh_str(mesh)}:"]
    width = max(len(c) for c in COMPONENTS)
    lines += [f"  {name:<{width}}  {format_bytes(result.components[name])}" for name in COMPONENTS]
    lines.append(f"  {'peak (' + result.phase + ')':<{width}}  {format_bytes(result.peak)}")
    return lines


__all__ = ["DEVICES", "Config", "run"]
