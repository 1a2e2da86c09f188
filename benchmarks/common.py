"""Shared pieces of the benchmark scripts: thread pinning, timing, machine description, JSON output.

Timings on a shared machine are noisy in one direction only (other work can slow a call down, never
speed it up), so every script reports the *fastest* call or block next to the median, and keeps the
load average beside the numbers.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def pin_threads(threads: int) -> dict[str, Any]:
    """Use ``threads`` CPU threads in PyTorch (also inside openmm-torch, which shares this libtorch)
    and in OpenMM's CPU platform (``OPENMM_CPU_THREADS``, read when a CPU Context is made; the
    scripts also pass the ``Threads`` property). Returns the settings for the result file."""
    torch.set_num_threads(threads)
    os.environ["OPENMM_CPU_THREADS"] = str(threads)
    return {"torch_threads": torch.get_num_threads(), "openmm_cpu_threads": threads,
            "how": "torch.set_num_threads and OpenMM CPU property Threads / OPENMM_CPU_THREADS"}


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(function: Callable[[], Any], repeats: int, device: torch.device | str, budget_s: float,
          warmup: int = 2) -> dict[str, Any]:
    """Median and fastest wall time per call (ms) after ``warmup`` calls; stops once ``budget_s`` is spent."""
    for _ in range(warmup):  # allocations, TorchScript profiling runs
        function()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "calls": len(times)}


def best_of_blocks(blocks: dict[str, Callable[[], float]], n_blocks: int) -> dict[str, dict[str, Any]]:
    """Run the named block functions (each returns ms per step) in turn, ``n_blocks`` rounds.

    Alternating keeps load from other processes from favouring one contender; the fastest block counts.
    """
    times: dict[str, list[float]] = {name: [] for name in blocks}
    for _ in range(n_blocks):
        for name, block in blocks.items():
            times[name].append(block())
    return {name: {"ms_per_step": min(t), "ms_per_step_blocks": t} for name, t in times.items()}


def step_block(context: Any, steps: int) -> float:
    """ms per MD step of an OpenMM Context over ``steps`` steps (the energy read waits for the device)."""
    start = time.perf_counter()
    context.getIntegrator().step(steps)
    context.getState(getEnergy=True)
    return 1e3 * (time.perf_counter() - start) / steps


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """CPU model and cores, GPU (when one is used or present), load averages, Python and torch versions."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1_5_15min": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        index = torch.device(device).index if device is not None and torch.device(device).type == "cuda" else None
        info["gpu"] = torch.cuda.get_device_name(index or 0)
    return info


def device_name(device: torch.device) -> str:
    return cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)


def torch_result(benchmark: str, device: torch.device, threads: int, rows: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    """The JSON layout shared by the PyTorch-level benchmarks: what, where, with which threads, results."""
    return {
        "benchmark": benchmark,
        "device": device_name(device),
        "threads": threads,
        **settings,
        "torch": torch.__version__,
        # Other work on the machine skews CPU timings: keep the load next to the numbers.
        "machine": machine_info(device),
        "results": rows,
    }


def write_json(path: Path, result: dict[str, Any]) -> Path:
    """Write ``result`` (plus the load average at the end) to ``path`` atomically."""
    result = dict(result)
    result.setdefault("load_average_at_end", list(os.getloadavg()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", flush=True)
    return path
