"""CPU-bound kernels, timed from inside Python so interpreter start-up is not counted.

Run natively (`python3 kernels.py`) it prints the same JSON the `main` task returns in Capsule.
"""

import json
import re

from capsule import task
from timing import best_of


def nbody(steps):
    bodies = [
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 39.47841760435743],
        [4.84, -1.16, -0.10, 0.606, 2.81, -0.02, 0.037],
        [8.34, 4.12, -0.40, -1.01, 1.82, 0.008, 0.011],
        [12.89, -15.11, -0.22, 1.08, 0.868, -0.010, 0.0017],
        [15.37, -25.91, 0.179, 0.979, 0.594, -0.034, 0.002],
    ]
    pairs = [(bodies[i], bodies[j]) for i in range(5) for j in range(i + 1, 5)]
    dt = 0.01
    for _ in range(steps):
        for (a, b) in pairs:
            dx, dy, dz = a[0] - b[0], a[1] - b[1], a[2] - b[2]
            mag = dt * (dx * dx + dy * dy + dz * dz) ** -1.5
            bm, am = b[6] * mag, a[6] * mag
            a[3] -= dx * bm
            a[4] -= dy * bm
            a[5] -= dz * bm
            b[3] += dx * am
            b[4] += dy * am
            b[5] += dz * am
        for body in bodies:
            body[0] += dt * body[3]
            body[1] += dt * body[4]
            body[2] += dt * body[5]
    return round(bodies[0][0], 6)


def json_round_trip(rounds):
    document = {"users": [{"id": i, "name": f"user{i}", "tags": ["a", "b"], "score": i * 1.5} for i in range(200)]}
    size = 0
    for _ in range(rounds):
        size = len(json.loads(json.dumps(document))["users"])
    return size


def regex(rounds):
    text = " ".join(f"order-{i} shipped to user{i}@example.com on 2024-0{i % 9 + 1}-1{i % 9}" for i in range(300))
    pattern = re.compile(r"([a-z0-9]+)@([a-z]+)\.com on (\d{4})-(\d{2})-(\d{2})")
    found = 0
    for _ in range(rounds):
        found = len(pattern.findall(text))
    return found


def sort_and_dict(rounds):
    total = 0
    for r in range(rounds):
        values = [(i * 7919 + r) % 10007 for i in range(5000)]
        values.sort()
        counts = {}
        for v in values:
            counts[v % 97] = counts.get(v % 97, 0) + 1
        total += len(counts) + values[0]
    return total


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def build_strings(rounds):
    length = 0
    for r in range(rounds):
        parts = []
        for i in range(2000):
            parts.append(f"{i}:{r}-" + str(i * r).zfill(8))
        text = ",".join(parts)
        length = len(text.upper().replace("-", "_").split(","))
    return length


KERNELS = {
    "nbody": (nbody, 20_000),
    "json": (json_round_trip, 200),
    "regex": (regex, 200),
    "sort_dict": (sort_and_dict, 60),
    "fib": (fib, 27),
    "strings": (build_strings, 60),
}


@task(compute="HIGH", ram="256MB", timeout="10m", max_retries=0)
def main(repeat=3):
    """The best of `repeat` timings of each kernel, in seconds."""
    return best_of(KERNELS, repeat)


if __name__ == "__main__":
    import sys

    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
