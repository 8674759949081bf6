"""Mixed work for `cargo xtask soak`: every way a task can end, again and again."""

from capsule import http, task


@task(max_retries=0)
def ok(n: int) -> int:
    return n * 2


@task(max_retries=0)
def raises(n: int):
    raise ValueError(f"bad input {n}")


@task(max_retries=0, timeout="20ms")
def too_slow():
    while True:
        pass


@task(max_retries=0, compute=2_000_000)
def too_much_cpu():
    total = 0
    while True:
        total += 1


@task(max_retries=0, ram="48MiB")
def too_much_memory():
    return len(bytearray(64 << 20))


@task(max_retries=0)
def refused() -> str:
    try:
        http.get("http://127.0.0.1:9/")
    except http.RequestRefused:
        return "refused"
    return "sent"


@task(max_retries=0)
def fan_out(n: int) -> int:
    return sum(ok.map(range(n)))
