"""How much work a request is, in cost units (steps x pixels), and how fast a GPU is in them.

Generation time grows roughly with steps x width x height, times n_iter x batch_size, plus
a second pass when `enable_hr` (docs/backends.md). A backend's speed is learned
in units per second from its own finished jobs, so a request's expected duration on a given
backend is cost / speed.
"""

from __future__ import annotations

from typing import Any

from app.domain.jobs import ExecutorType, GenType, Job

# Backend defaults when the payload leaves a field out (each backend API's own defaults).
DEFAULT_STEPS = {ExecutorType.AUTOMATIC1111: 50, ExecutorType.KANDINSKY: 30}
DEFAULT_SIDE_PX = 512

# A reference GPU (a consumer card of the RTX 3060 class) runs a 512x512, 50-step SD 1.5 job
# in about 10 s: 512*512*50/10 = ~1.3M units/s. Used until a backend has finished a job.
REFERENCE_JOB_UNITS = 512 * 512 * 50
REFERENCE_UNITS_PER_S = REFERENCE_JOB_UNITS / 10.0

# Relative speed of common GPUs against that reference, matched as a substring of the
# executors file's `gpu` field. Rough public figures; only a seed until real jobs are timed.
# Checked in this order, so "a100" is tried before "a10".
GPU_SPEED_HINTS = {
    "4090": 4.0,
    "4080": 3.0,
    "3090": 2.2,
    "a100": 4.0,
    "h100": 6.0,
    "a6000": 2.2,
    "4070": 2.0,
    "4060": 1.3,
    "3080": 1.9,
    "3070": 1.4,
    "3060": 1.0,
    "2080": 0.9,
    "a10": 1.5,
    "v100": 1.4,
}


def job_cost_units(job: Job) -> float:
    if job.payload is None:
        raise ValueError(f"{job.object_id}: its payload waits in the database; load it to cost it")
    return payload_cost_units(job.executor, job.gen_type, job.payload)


def payload_cost_units(executor: ExecutorType, gen_type: GenType, payload: dict[str, Any]) -> float:
    steps = payload.get("steps") or DEFAULT_STEPS[executor]
    width = payload.get("width") or DEFAULT_SIDE_PX
    height = payload.get("height") or DEFAULT_SIDE_PX
    images = (payload.get("n_iter") or 1) * (payload.get("batch_size") or 1)
    units = float(steps) * width * height * images
    if executor is ExecutorType.AUTOMATIC1111 and gen_type is GenType.IMG2IMG:
        # img2img runs only the denoised share of its steps.
        strength = payload.get("denoising_strength")
        if isinstance(strength, (int, float)) and 0 < strength <= 1:
            units *= max(strength, 0.1)
    if payload.get("enable_hr"):
        scale = payload.get("hr_scale") or 2.0
        hr_width = payload.get("hr_resize_x") or width * scale
        hr_height = payload.get("hr_resize_y") or height * scale
        hr_steps = payload.get("hr_second_pass_steps") or steps
        units += float(hr_steps) * hr_width * hr_height * images
    return units


def has_speed_hint(gpu: str, speed_hint: float | None) -> bool:
    """Whether the executors file says how fast a backend is (`speed`, or a known GPU name)."""
    name = gpu.lower().replace(" ", "")
    return bool(speed_hint) or any(marker in name for marker in GPU_SPEED_HINTS)


def initial_units_per_s(gpu: str, speed_hint: float | None) -> float:
    """A backend's speed before it has finished anything: the executors file's `speed`
    (relative to the reference GPU), else a known GPU name, else the reference."""
    if speed_hint:
        return REFERENCE_UNITS_PER_S * speed_hint
    name = gpu.lower().replace(" ", "")
    for marker, factor in GPU_SPEED_HINTS.items():
        if marker in name:
            return REFERENCE_UNITS_PER_S * factor
    return REFERENCE_UNITS_PER_S
