"""What this machine runs fast: the precision that ``auto`` means, and how many threads to use.

``auto`` precision is bf16 autocast only where the hardware computes bf16 natively (a CPU with
AVX512-BF16 or AMX, a CUDA GPU with bf16 support), fp16 mixed precision on older CUDA GPUs, fp32
everywhere else. On a CPU the flags alone are not trusted: a short matmul benchmark at the
decoder's sizes must also show bf16 faster, because where bf16 is emulated (AVX2 CPUs) a bf16
matmul runs about 100x slower than fp32 and a "mixed precision" run would crawl.

``auto`` threads is the number of cores this process may use, less the cores that other
processes keep busy right now: on a 2-core machine with one core taken, two threads that wait on
each other at every parallel region run slower than one.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

from captioner.utils.cpu import usable_cores

# Lightning's precision strings, plus "auto"
TRAINER_PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true",
                      "64-true", "64", "bf16", "16")
DECODE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# matmul speed-up over fp32 that bf16 must show before ``auto`` picks it
MIN_BF16_SPEEDUP = 1.2


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` resolved to: ``trainer`` (a Lightning precision string), ``decode``
    (``Captioner.generate``'s ``precision``) and the reason, for the run's log and metrics."""

    trainer: str
    decode: str
    reason: str


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16, by the kernel's flags or torch's own probe."""
    flags = cpu_flags()
    if {"avx512_bf16", "amx_bf16"} & flags:
        return True
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(p()) for p in probes if p is not None)


def matmul_rate(dtype: torch.dtype, m: int = 64, k: int = 512, n: int = 512,
                budget_s: float = 0.1) -> float:
    """GFLOP/s of an (m, k) @ (k, n) CPU matmul in ``dtype``, timed for about ``budget_s``
    (at least one call, so an emulated path costs one slow call, not a long loop)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up: first-call allocation and kernel selection
    calls, start = 0, time.perf_counter()
    while True:
        a @ b
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return 2 * m * k * n * calls / elapsed / 1e9


def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matmul rate at a decoder step's size (a (64, 512) @ (512, 512) matmul)."""
    return matmul_rate(torch.bfloat16) / matmul_rate(torch.float32)


def _cpu_choice() -> PrecisionChoice:
    cpu = f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"
    if not cpu_has_native_bf16():
        return PrecisionChoice("32-true", "fp32", f"fp32: CPU {cpu} has no native bf16 "
                               "(no AVX512-BF16/AMX): bf16 would be emulated, far slower")
    speedup = cpu_bf16_speedup()
    if speedup < MIN_BF16_SPEEDUP:
        return PrecisionChoice("32-true", "fp32", f"fp32: CPU {cpu} reports bf16 units but a bf16 "
                               f"matmul ran only {speedup:.2f}x the fp32 rate")
    return PrecisionChoice("bf16-mixed", "bf16", f"bf16 autocast: CPU {cpu} has native bf16, "
                           f"matmul {speedup:.2f}x the fp32 rate")


def _cuda_choice(device: int = 0) -> PrecisionChoice:
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported():
        return PrecisionChoice("bf16-mixed", "bf16", f"bf16 autocast: GPU {name} supports bf16")
    return PrecisionChoice("16-mixed", "fp16", f"fp16 mixed precision: GPU {name} has no bf16")


@functools.lru_cache(maxsize=None)
def auto_precision(device_type: str) -> PrecisionChoice:
    """The fast precision for ``device_type`` ("cpu", "cuda", "mps", ...), measured once per
    process."""
    if device_type == "cuda" and torch.cuda.is_available():
        return _cuda_choice()
    if device_type == "cpu":
        return _cpu_choice()
    return PrecisionChoice("32-true", "fp32", f"fp32: no mixed-precision rule for {device_type}")


def training_device_type(accelerator: str = "auto") -> str:
    """The device type Lightning's ``accelerator`` setting will train on."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    if accelerator in ("auto", "gpu", "mps") and getattr(torch.backends, "mps", None) \
            and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_trainer_precision(precision, accelerator: str = "auto") -> tuple[str, str]:
    """(Lightning precision, reason): ``auto`` decided from the hardware, anything else kept."""
    precision = str(precision)
    if precision != "auto":
        return precision, f"{precision}: set explicitly"
    choice = auto_precision(training_device_type(accelerator))
    return choice.trainer, choice.reason


def resolve_decode_precision(precision, device_type: str) -> str | None:
    """``Captioner.generate``'s precision: ``auto`` decided from the hardware; None (run as the
    caller runs) and explicit values kept."""
    if precision == "auto":
        return auto_precision(device_type).decode
    return precision


# ---- threads ------------------------------------------------------------------------------------
def _cpu_times() -> dict[str, tuple[int, int]]:
    """{cpuN: (busy, total)} jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in fields[:8]]
                idle = v[3] + v[4]  # idle + iowait
                out[name] = (sum(v) - idle, sum(v))
    return out


def busy_cores(interval_s: float = 0.25, threshold: float = 0.5) -> int:
    """How many of this process's cores other processes keep busy: cores more than
    ``threshold`` busy over ``interval_s`` while this process sleeps. 0 where /proc/stat is
    not readable."""
    try:
        allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        before = _cpu_times()
        time.sleep(interval_s)
        after = _cpu_times()
    except (AttributeError, OSError, ValueError):
        return 0
    busy = 0
    for name in allowed & before.keys() & after.keys():
        d_busy = after[name][0] - before[name][0]
        d_total = after[name][1] - before[name][1]
        if d_total > 0 and d_busy / d_total > threshold:
            busy += 1
    return busy


def auto_threads() -> tuple[int, str]:
    """(threads, reason): the usable cores less those busy with other work, at least one."""
    cores = usable_cores()
    busy = busy_cores() if cores > 1 else 0
    threads = max(1, cores - busy)
    reason = f"{threads} of {cores} usable cores" + (f" ({busy} busy with other processes)" if busy else "")
    return threads, reason


def spare_cores(threads: int) -> int:
    """Cores left beside ``threads`` compute threads (at most 4)."""
    return max(0, min(4, usable_cores() - threads))


def auto_workers(threads: int) -> int:
    """Data-loader worker processes beside ``threads`` compute threads: the spare cores, but at
    least 1 where there are 2+ cores (decoding in the training loop itself would stall it)."""
    return 0 if usable_cores() < 2 else max(1, spare_cores(threads))


def set_threads(threads: int | str | None = None) -> tuple[int, str]:
    """Apply ``threads`` (None or "auto": ``auto_threads()``) to torch's intra-op pool and,
    where still possible, its inter-op pool; returns (threads, reason)."""
    if threads in (None, "auto"):
        threads, reason = auto_threads()
    else:
        threads, reason = int(threads), "set explicitly"
    torch.set_num_threads(threads)
    try:  # only possible before the first inter-op parallel work of the process
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass
    return threads, reason


# ---- what benchmarks report ---------------------------------------------------------------------
def machine_info() -> dict:
    """The facts every published number needs beside it: CPU model, vector extensions, whether
    bf16 is native, cores and torch."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx2": "avx2" in flags, "avx512": any(f.startswith("avx512") for f in flags),
            "native_bf16": cpu_has_native_bf16(), "usable_cores": usable_cores(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def machine_line(info: dict | None = None) -> str:
    info = info or machine_info()
    ext = "AVX-512" if info["avx512"] else ("AVX2" if info["avx2"] else info["cpu_capability"])
    bf16 = "native bf16" if info["native_bf16"] else "no native bf16 (emulated)"
    return (f"CPU {info['cpu']} ({ext}, {bf16}), {info['usable_cores']} cores, "
            f"torch {info['torch']}" + (f", GPU {info['gpu']}" if info["gpu"] else ""))


def benchmark_precisions(requested: list[str] | None = None) -> list[str]:
    """The precisions a benchmark times: as requested, else fp32 plus bf16 where it is native
    (an emulated bf16 row would only measure the emulation)."""
    if requested:
        return list(requested)
    return ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]
