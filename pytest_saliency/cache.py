"""A bounded cache of the original model's attributions, shared by the checks of a session.

IPR, then CPR, then a sweep's reference, then a baseline check all start by explaining the same
inputs with the same model: the first computes, the others reuse. Entries are keyed by a
fingerprint of the model's parameters and buffers, the inputs, the targets, the method, its
options and its seed, so a model changed in between (retrained, or randomized by a check in
progress) never hits a stale entry. Least-recently-used entries are dropped beyond ``max_bytes``.

The fingerprint is computed on the tensors' own device (three reductions per tensor in float64,
one of them position-weighted so that a permutation of the weights changes it) and only a few
scalars cross to the host. It is not cryptographic; it distinguishes models that differ,
including by a permutation of their weights, which is all a cache needs.

User callables are never cached: their identity says nothing about what they compute.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from ._torch import module_settings, require_torch

DEFAULT_MAX_BYTES = 512 * 2**20


def tensor_fingerprint(tensors: list[tuple[str, Any]]) -> str:
    """A hex digest of names, shapes, dtypes and content checksums of ``(name, tensor)`` pairs."""
    torch = require_torch()
    digest = hashlib.blake2b(digest_size=16)
    sums = []
    for name, tensor in tensors:
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{tensor.device.type};".encode())
        if tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).sin_()
        sums.append(torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()]))
    if sums:
        digest.update(torch.cat(sums).cpu().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: Any) -> str:
    """The parameters' and buffers' values, and each module's type and plain settings: a model and
    a variant with equal weights but another activation, or a flag that changes its forward pass
    (Monte Carlo dropout on), do not share maps."""
    architecture = repr([(name, type(module).__module__, type(module).__qualname__,
                          [setting for setting in module_settings(module) if setting[0] != "training"])
                         for name, module in model.named_modules()])  # (checks run in eval mode anyway)
    return tensor_fingerprint(list(model.named_parameters()) + list(model.named_buffers())) + architecture


class MapCache:
    """LRU cache of attribution tensors, bounded in bytes; pass one to several checks to share work."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def key(self, model: Any, inputs: Any, target: Any, method: str, options: dict[str, Any], seed: int,
            batch_size: int | None) -> str:
        parts = [
            model_fingerprint(model),
            tensor_fingerprint([("inputs", inputs), ("target", target)]),
            method,
            repr(sorted((k, repr(v)) for k, v in options.items())),
            str(seed),
            str(batch_size),
        ]
        return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()

    def get(self, key: str) -> Any:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: Any) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if key in self._entries:
            old = self._entries.pop(key)
            self.bytes -= old.numel() * old.element_size()
        self._entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()

    def __len__(self) -> int:
        return len(self._entries)
