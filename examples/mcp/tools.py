"""Tools for an agent: `capsule mcp examples/mcp/tools.py` offers each task as an MCP tool,
with an input schema read from its signature, beside `run_python` and sessions."""

from typing import Literal

from capsule import task


@task(compute="LOW", ram="64MB", timeout="10s", max_retries=0)
def word_count(text: str, unique: bool = False) -> int:
    """Counts the words of `text` (only the distinct ones with `unique`)."""
    words = text.lower().split()
    return len(set(words)) if unique else len(words)


@task(compute="MEDIUM", ram="128MB", timeout="30s", max_retries=0)
def convert(value: float, unit: Literal["km", "mi"] = "km") -> float:
    """Converts a distance in `unit` to the other unit (kilometres and miles)."""
    return round(value / 1.609344, 3) if unit == "km" else round(value * 1.609344, 3)
