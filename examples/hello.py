"""The smallest Capsule program: one task, run with `capsule run examples/hello.py`."""

from capsule import task


@task(name="main", compute="LOW", ram="64MB", timeout="10s")
def main(name: str = "world") -> str:
    print(f"running inside a {__import__('sys').platform} sandbox")
    return f"Hello, {name}, from Capsule!"
