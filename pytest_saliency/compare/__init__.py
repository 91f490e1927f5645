"""Comparisons and statistics: batched similarity and agreement metrics with their chance levels, and the
statistics that turn per-image numbers into a verdict."""
