"""Message hygiene: statuses and Events carry one short line."""

from __future__ import annotations


def one_line(text: str | None, limit: int = 512) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
