"""Helpers the benchmark scripts share for their reports."""

from __future__ import annotations

import statistics


def per_rep_ratio(num: list[float], den: list[float]) -> float:
    """The median of the per-repeat ratios ``num[i] / den[i]`` (NaN if there are none)."""
    pairs = [a / b for a, b in zip(num, den, strict=False) if b > 0]
    return statistics.median(pairs) if pairs else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
