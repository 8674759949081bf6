"""A fan-out of trivial sub-tasks: what a queue adds per call."""

from capsule import gather, task


@task(timeout="60s", max_retries=0)
def square(i: int) -> int:
    return i * i


@task(timeout="600s", max_retries=0)
def main(count: int = 200) -> int:
    total = 0
    for start in range(0, count, 50):
        total += sum(gather(*[square.spawn(i) for i in range(start, min(start + 50, count))]))
    return total
