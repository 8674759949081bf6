"""A coordinator fanning work out to sub-tasks, each in its own sandbox with its own limits.

    capsule run examples/fan_out.py --verbose
    capsule run examples/fan_out.py --args-json '[["alpha beta", "gamma", "delta epsilon zeta"]]'
"""

from capsule import TaskError, task


@task(compute="LOW", ram="64MB", timeout="10s", max_retries=1)
def count_words(text: str) -> int:
    if not text.strip():
        raise ValueError("empty document")
    return len(text.split())


@task(timeout="1m")
def main(documents=("one two three", "four five", "six", "")) -> dict:
    handles = [count_words.spawn(doc) for doc in documents]
    counts, failures = [], []
    for doc, handle in zip(documents, handles):
        try:
            counts.append(handle.result())
        except TaskError as error:
            failures.append({"document": doc, "error": error.type, "message": error.message})
    return {"total": sum(counts), "counts": counts, "failures": failures}
