"""A bounded cache of the original model's attributions, shared by the checks of a session.

IPR, then CPR, then a sweep's reference, then a baseline check all start by explaining the same
inputs with the same model: the first computes, the others reuse. Entries are keyed by
fingerprints (:mod:`pytest_saliency.core.fingerprint`) of the model, the inputs, the targets, the
method, its options and its seed, so a model changed in between (retrained, or randomized by a
check in progress) never hits a stale entry. Least-recently-used entries are dropped beyond
``max_bytes``.

A model or an option whose fingerprint cannot prove what it computes is uncacheable:
``MapCache.key`` returns None, ``get(None)`` never hits and ``put(None, ...)`` stores nothing.

Entries are stored compact: a view (say the original model's column of a stack of every
state's maps) is copied, so that the cache never pins the tensor it came from, and ``bytes``
counts the storage the cache holds.

User callables are never cached: their identity says nothing about what they compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..core.fingerprint import model_fingerprint, tensor_fingerprint, value_fingerprint
from ..core.forward import current_call
from ..core.integrity import short_usage_errors
from ..core.torchtools import require_torch
from ..core.validation import check_count

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_BYTES = 512 * 2**20


def _call_fingerprint() -> str | None:
    """The ambient :class:`~pytest_saliency.core.forward.ModelCall` by value (None: uncacheable)."""
    call = current_call()
    text = None if call.text is None else dataclasses.asdict(call.text)
    tabular = None if call.tabular is None else dataclasses.asdict(call.tabular)
    return value_fingerprint({"output": call.output, "static": dict(call.static),
                              "per_example": dict(call.per_example), "modality": call.modality, "text": text,
                              "tabular": tabular})


class MapCache:
    """LRU cache of attribution tensors, bounded in bytes; pass one to several checks to share work."""

    @short_usage_errors
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = check_count(max_bytes, "max_bytes", minimum=0,
                                     hint="It bounds the bytes of maps the cache holds (0 caches nothing).")
        self._entries: OrderedDict[str, tuple[torch.Tensor, int]] = OrderedDict()  # key: (tensor, bytes held)
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @short_usage_errors
    def key(self, model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor, method: str,
            options: dict[str, Any], seed: int, batch_size: int | None) -> str | None:
        """The entry's key, or None when the model or an option is uncacheable (see the module
        docstring): ``get(None)`` misses and ``put(None, ...)`` stores nothing."""
        fingerprint = model_fingerprint(model)
        # options by value, their tensors by content and their functions by code
        settings = value_fingerprint(dict(sorted(options.items())))
        call = _call_fingerprint()  # how the model is called: output=, forward_kwargs=, modality
        if fingerprint is None or settings is None or call is None:
            return None
        parts = [
            fingerprint,
            call,
            tensor_fingerprint([("inputs", inputs), ("target", target)]),
            method,
            settings,
            str(seed),
            str(batch_size),
        ]
        return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()

    @short_usage_errors
    def get(self, key: str | None) -> torch.Tensor | None:
        entry = self._entries.get(key) if key is not None else None
        if key is None or entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry[0]

    @short_usage_errors
    def put(self, key: str | None, value: torch.Tensor) -> None:
        """Store a compact, detached copy of ``value`` when it is a view of a larger storage (or
        carries a graph), so that the entry holds only its own bytes; ``bytes`` counts them."""
        if key is None:
            return
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        value = value.detach()
        if value.untyped_storage().nbytes() != size or not value.is_contiguous():
            value = value.clone(memory_format=require_torch().contiguous_format)
        size = value.untyped_storage().nbytes()
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

    def __len__(self) -> int:
        return len(self._entries)
