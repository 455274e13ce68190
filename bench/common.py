"""Timing helpers the benchmarks share.

Figures are the best (fastest) of several runs: on a shared machine noise only ever slows a run down, so
the minimum is the most repeatable estimate of what the code itself costs (as Python's timeit advises).
"""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Best seconds of fn() over `repeats` runs after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def mean_time(fn, device: torch.device, calls: int) -> float:
    """Mean seconds of `calls` back-to-back calls of fn() (no warm-up)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls
