"""Capsule's built-in interpreter image: `run_python` runs a code string like a notebook cell
(see `_capsule_interpreter` in the runtime). Its limits come with each call."""

from capsule import task
from _capsule_interpreter import run_cell


@task(name="run_python", max_retries=0)
def run_python(code: str):
    return run_cell(code)
