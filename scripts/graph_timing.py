"""Kernel timing inside a CUDA graph, shared by the device scripts (bench_kernels.py, check_*.py).

Owns one thing: the median time per call of a list of calls captured back to back in one CUDA
graph and replayed (no launch overhead, no host gaps). Callers rotate over enough weight copies
that a timed call does not find its data in L2.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def graph_us(calls: list[Callable[[], object]], replays: int = 12) -> float:
    """Median microseconds per call: all calls captured in one CUDA graph, replayed."""
    side = torch.cuda.Stream()  # warm-up off the capture stream (compiles, allocator)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls[:3]:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)
