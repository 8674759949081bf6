"""Several tasks with typed arguments.

    capsule run examples/word_stats.py "the cat and the hat"
    capsule run examples/word_stats.py --task histogram --args-json '[[1, 5, 7, 9, 12], 3]'
    capsule run examples/word_stats.py --task histogram --json --args-json '[[1, 2], 0]'
"""

import collections
import re
import statistics

from capsule import task


@task(compute="LOW", ram="64MB", timeout="5s")
def main(text: str = "the quick brown fox jumps over the lazy dog and the cat") -> dict:
    words = re.findall(r"[a-z']+", text.lower())
    return {
        "words": len(words),
        "distinct": len(set(words)),
        "top": collections.Counter(words).most_common(3),
        "mean_length": round(statistics.mean(len(w) for w in words), 2) if words else 0,
    }


@task(name="histogram", compute="LOW", ram="64MB", max_retries=0)
def histogram(numbers: list, buckets: int = 4) -> list:
    """Counts of `numbers` in `buckets` equal-width ranges."""
    if buckets <= 0:
        raise ValueError(f"buckets must be positive, not {buckets}")
    low, high = min(numbers), max(numbers)
    width = (high - low) / buckets or 1
    counts = [0] * buckets
    for number in numbers:
        counts[min(int((number - low) / width), buckets - 1)] += 1
    return counts
