"""Foundations every layer stands on: torch access, seeds and generators, argument validation, the
model-integrity guard, fingerprints of models and tensors, JSON conversion and device placement.
Nothing here knows about checks or reports."""
