"""Timings of one hello call from a Python process, for `cargo xtask bench`.

    python sdk.py capsule   FILE N   # capsule.run(FILE), warm: cache check and daemon included
    python sdk.py async     FILE N   # N concurrent capsule.run_async(FILE): all must complete
    python sdk.py reference FILE N   # the reference implementation's `await capsule.run(file=...)`
    python sdk.py monty     -    N   # pydantic-monty: check out a worker and run the same function

Prints JSON: {"p50_ms": ..., "p99_ms": ...} (for `async`: {"seconds": ..., "completed": ...}).
"""

import asyncio
import json
import sys
import time

HELLO = 'def main(name="world"):\n    return f"hello {name}"\nmain("Ada")'


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


def main():
    mode, file, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "capsule":
        import capsule

        def call():
            assert capsule.run(file, args=["Ada"]).success

        print(json.dumps(timed(call, n)))
    elif mode == "async":
        import capsule

        async def many():
            return await asyncio.gather(*(capsule.run_async(file, args=[f"n{i}"]) for i in range(n)))

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
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
