"""The timing loop the benchmark's kernel files share."""

import time


def best_of(kernels, repeat):
    """The best of `repeat` timings of each `name: (kernel, size)`, in seconds."""
    timings = {}
    for name, (kernel, size) in kernels.items():
        best = None
        for _ in range(repeat):
            started = time.perf_counter()
            kernel(size)
            elapsed = time.perf_counter() - started
            best = elapsed if best is None else min(best, elapsed)
        timings[name] = best
    return timings
