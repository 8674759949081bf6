"""The task every latency figure in BENCHMARKS.md is measured on."""

from capsule import task


@task(compute="LOW", ram="64MB", max_retries=0)
def main(name="bench"):
    return f"hello {name}"


if __name__ == "__main__":
    print(main())
