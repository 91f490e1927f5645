"""Foundations every layer stands on: torch access, seeds and generators, input validation, the
model-integrity guard and device placement. Nothing here knows about checks or reports."""
