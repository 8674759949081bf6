"""Tasks that overstep their limits, and what Capsule reports for each.

    capsule run examples/limits.py --task spin --json      # error type "fuel"
    capsule run examples/limits.py --task hog --json       # error type "memory"
    capsule run examples/limits.py --task nap --json       # error type "timeout"
    capsule run examples/limits.py --task flaky --json     # retried, then "exception"
"""

import time

from capsule import task


@task(compute="LOW", max_retries=0)
def spin():
    count = 0
    while True:
        count += 1


@task(ram="64MB", max_retries=0)
def hog():
    chunks = []
    while True:
        chunks.append(bytearray(1 << 20))


@task(timeout="1s", max_retries=0)
def nap():
    time.sleep(10)
    return "rested"


@task(max_retries=2)
def flaky():
    raise ConnectionError("the service is down")
