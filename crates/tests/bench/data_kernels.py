"""numpy and pandas kernels for the `data` runtime, timed from inside Python.

Run natively (`python data_kernels.py 3`, with numpy and pandas installed) it prints the same
JSON the `main` task returns in Capsule. Native BLAS is held to one thread by the bench.
"""

import json

import numpy as np
import pandas as pd
from capsule import task
from timing import best_of


def matmul(n, dtype=np.float64):
    a = (np.arange(n * n, dtype=np.float64).reshape(n, n) / (n * n)).astype(dtype)
    return float((a @ a.T)[0, 0])


def matmul_float32(n):
    return matmul(n, np.float32)


def solve(n):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)) + n * np.eye(n)
    return float(np.linalg.solve(a, np.ones(n))[0])


def groupby(rows):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"key": rng.integers(0, 100, rows), "value": rng.random(rows)})
    return float(frame.groupby("key")["value"].agg(["sum", "mean", "count"])["sum"].sum())


KERNELS = {
    "matmul 1000x1000": (matmul, 1000),
    "matmul 1000x1000 float32": (matmul_float32, 1000),
    "linalg.solve 200x200": (solve, 200),
    "pandas groupby 100,000 rows": (groupby, 100_000),
}


@task(compute="HIGH", ram="512MB", timeout="10m", max_retries=0)
def main(repeat=3):
    """The best of `repeat` timings of each kernel, in seconds."""
    return best_of(KERNELS, repeat)


@task
def hello(name="world"):
    return f"hello {name}"


if __name__ == "__main__":
    import sys

    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
