"""One conversion of results, options and metadata to strict JSON values.

JSON has no NaN, no infinity, no tuples, no tensors: :func:`jsonable` maps non-finite numbers to
``None``, sequences and sets to lists, mapping keys to strings, numpy and torch scalars to Python
numbers, objects with ``to_dict`` to their dict, and anything else to its ``repr``. Arrays and
tensors depend on what the JSON is for (``tensors=``):

* ``"shape"`` -- ``"tensor(N, C, H, W)"``: an option value in a result (a baseline tensor passed to
  IG), where the values would bloat the report and say nothing to a reader;
* ``"values"`` -- nested lists: numbers a report shows (per-image scores kept as arrays);
* ``"digest"`` -- the shape, the dtype and a SHA-256 of dtype, shape and bytes
  (:func:`~pytest_saliency.core.fingerprint.array_digest`): metadata that must tell two tensors
  apart without storing them (a stored baseline's method options).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal

from .fingerprint import array_digest

TensorPolicy = Literal["shape", "values", "digest"]


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "tolist")


def _array(value: Any, tensors: TensorPolicy) -> Any:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
    shape = "tensor(" + ", ".join(str(int(s)) for s in value.shape) + ")"
    if tensors == "shape":
        return shape
    if tensors == "digest":
        return f"{shape} {str(value.dtype).removeprefix('torch.')} sha256:{array_digest(value)[:16]}"
    return jsonable(value.tolist(), tensors=tensors)


def jsonable(value: Any, *, tensors: TensorPolicy = "shape") -> Any:
    """A strict-JSON copy of ``value`` (see the module docstring for the rules)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, tensors=tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, tensors=tensors) for v in value]
    if _is_array(value):
        if not value.shape:  # a 0-d tensor or a numpy scalar: its number
            return jsonable(value.item(), tensors=tensors)
        return _array(value, tensors)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return jsonable(to_dict(), tensors=tensors)
    return repr(value)
