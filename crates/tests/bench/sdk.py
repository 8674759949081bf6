"""Timings of one hello call from a Python process, for `cargo xtask bench`.

    python sdk.py capsule   FILE N   # capsule.run(FILE), warm: the build's check included
    python sdk.py async     FILE N   # N concurrent capsule.run_async(FILE): all must complete
    python sdk.py reference FILE N   # the reference implementation's `await capsule.run(file=...)`
    python sdk.py monty     -    N   # pydantic-monty: check out a worker and run the same function
    python sdk.py python    -    N   # capsule.run_python("1 + 1"), warm
    python sdk.py session   -    N   # Session.run("x += 1") in one session
    python sdk.py save      -    N   # save and restore a session holding 10 MB, N times each
    python sdk.py monty-python  - N  # pydantic-monty: check out a worker and run "1 + 1"
    python sdk.py monty-session - N  # pydantic-monty: feed_run("x += 1") in one checked-out session
    python sdk.py rss       -    N   # this process's RSS after 1,000 run_python calls, then after N more

Capsule's modes run in this process's engine, or through the daemon on the socket
`CAPSULE_BENCH_DAEMON` names (`capsule.connect`).

Prints JSON: {"p50_ms": ..., "p99_ms": ...} (for `async`: {"seconds": ..., "completed": ...};
for `save`: the p50 of each and the sizes).
"""

import asyncio
import json
import os
import sys
import time

HELLO = 'def main(name="world"):\n    return f"hello {name}"\nmain("Ada")'

# A session as an agent leaves it: a few modules imported and 10 MB of data that does not compress.
SESSION_STATE = "import json, re, datetime, os\ndata = os.urandom(10 << 20)\nseen = {'when': datetime.date.today()}"


def session_store():
    import os
    import pathlib

    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.environ["HOME"], ".local/share")
    return pathlib.Path(data) / "capsule" / "sessions"


def percentiles(samples):
    samples = sorted(samples)
    return {"p50_ms": samples[len(samples) // 2] * 1e3, "p99_ms": samples[int((len(samples) - 1) * 0.99)] * 1e3}


def timed(call, n, warm_up=50):
    for _ in range(warm_up):
        call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def where():
    """Where Capsule's calls go: the package's functions (this process), or a daemon's client;
    and the client for sessions (None: this process)."""
    import capsule

    socket = os.environ.get("CAPSULE_BENCH_DAEMON")
    client = capsule.connect(socket) if socket else None
    return client or capsule, client


def main():
    mode, file, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "capsule":
        api, _ = where()

        def call():
            assert api.run(file, args=["Ada"]).success

        print(json.dumps(timed(call, n)))
    elif mode == "async":
        api, _ = where()

        async def many():
            return await asyncio.gather(*(api.run_async(file, args=[f"n{i}"]) for i in range(n)))

        asyncio.run(many())  # warm: the connections, the build check
        started = time.perf_counter()
        results = asyncio.run(many())
        completed = sum(1 for i, r in enumerate(results) if r.success and f"n{i}" in r.result)
        print(json.dumps({"seconds": time.perf_counter() - started, "completed": completed}))
    elif mode == "reference":
        import capsule

        loop = asyncio.new_event_loop()

        def call():
            result = loop.run_until_complete(capsule.run(file=file, args=["Ada"]))
            assert result["success"], result

        print(json.dumps(timed(call, n)))
    elif mode == "monty":
        import pydantic_monty

        with pydantic_monty.Monty(min_processes=1) as pool:

            def call():
                with pool.checkout() as session:
                    assert session.feed_run(HELLO) == "hello Ada"

            print(json.dumps(timed(call, n)))
    elif mode == "python":
        api, _ = where()
        print(json.dumps(timed(lambda: api.run_python("1 + 1").unwrap(), n)))
    elif mode == "session":
        import capsule

        with capsule.Session(client=where()[1]) as session:
            session.run("x = 0").unwrap()
            print(json.dumps(timed(lambda: session.run("x += 1").unwrap(), n)))
    elif mode == "save":
        import capsule

        client = where()[1]
        with capsule.Session(ram="256MiB", client=client) as session:
            session.run(SESSION_STATE).unwrap()
            saves, restores, saved = [], [], None
            for _ in range(n):
                started = time.perf_counter()
                saved = session.save()
                saves.append(time.perf_counter() - started)
                started = time.perf_counter()
                with capsule.Session.restore(saved, client=client) as restored:
                    assert restored.run("len(data)").result == 10 << 20
                    restores.append(time.perf_counter() - started)
            size = (session_store() / f"{saved}.session").stat().st_size
        print(json.dumps({
            "save_ms": percentiles(saves)["p50_ms"], "restore_ms": percentiles(restores)["p50_ms"], "bytes": size,
        }))
    elif mode == "rss":
        api, _ = where()

        def rss():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

        for _ in range(1_000):
            api.run_python("1 + 1").unwrap()
        start = rss()
        for _ in range(n):
            api.run_python("1 + 1").unwrap()
        print(json.dumps({"start": start, "end": rss(), "calls": n}))
    elif mode == "monty-python":
        import pydantic_monty

        with pydantic_monty.Monty(min_processes=1) as pool:

            def call():
                with pool.checkout() as session:
                    assert session.feed_run("1 + 1") == 2

            print(json.dumps(timed(call, n)))
    elif mode == "monty-session":
        import pydantic_monty

        with pydantic_monty.Monty(min_processes=1) as pool, pool.checkout() as session:
            session.feed_run("x = 0")
            print(json.dumps(timed(lambda: session.feed_run("x += 1"), n)))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
