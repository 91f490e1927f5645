"""Regression baselines: stored maps that a retrained model's explanations are compared with.

One baseline per test and name: ``<dir>/<module>/<test>[__<name>].npz`` plus a human-readable
JSON sidecar. The ``.npz`` holds the maps (float32, compressed: float16 would add errors of
about 1e-3 to SSIM, the size of the tightest calibrated tolerances) and an authoritative copy of
the metadata as a plain string array, so the one atomic ``os.replace`` of the ``.npz`` is what
makes a new baseline visible: an interrupted run leaves the old file intact. Loading uses
``allow_pickle=False``; a file that needs unpickling is refused, never executed.

A baseline records what it was made from (method and options, preset, a SHA-256 of the inputs,
targets, seed, library versions, time). Comparing it with a call that differs in inputs,
method or preset is an error, not a silent comparison of unlike things.

Thresholds for retraining: a plain ``threshold`` on the mean per-image similarity, or
``reference_models=[...]`` (a few models trained with the same recipe and different seeds) when
the baseline is written: the lowest mean similarity between any two of them is stored as the
envelope, and a later model passes when it is at least as close to the baseline as the recipe's
own seeds are to each other.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._rng import rng_isolated
from ._torch import require_torch
from ._validation import check_inputs, check_model
from .exceptions import SaliencyUsageError
from .explainers import _attribute, prepare_method, resolve_target
from .parameter_randomization import _DERIVED_OPTIONS
from .postprocess import MapPipeline, apply_pipeline, get_pipeline

FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 0.9
BASELINE_METRICS = ("ssim", "spearman", "pearson")
_MATCHED_FIELDS = ("input_fingerprint", "input_shape", "method", "method_options", "preset")


def input_fingerprint(inputs: Any) -> str:
    """SHA-256 of the inputs' float32 bytes and shape: the same data gives the same hash on any device."""
    torch = require_torch()
    data = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.tobytes())
    return digest.hexdigest()


def baseline_path(directory: Path | str, nodeid: str, name: str | None = None) -> Path:
    """``<dir>/<module stem>/<test name>[__<name>].npz`` with filesystem-safe names."""
    module, _, test = nodeid.partition("::")
    stem = Path(module).stem or "baselines"
    safe = re.sub(r"[^\w.\-\[\]]", "_", test.replace("::", ".")) or "test"
    if name:
        safe += "__" + re.sub(r"[^\w.\-]", "_", name)
    return Path(directory) / stem / f"{safe}.npz"


def _versions() -> dict[str, str]:
    import numpy as np

    torch = require_torch()
    from . import __version__

    try:
        import captum

        captum_version = captum.__version__
    except Exception:  # pragma: no cover - captum is a dependency
        captum_version = "unknown"
    return {"pytest_saliency": __version__, "torch": torch.__version__, "captum": captum_version,
            "numpy": np.__version__}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _checked_path(path: Path | str) -> Path:
    """The baseline's path, refused when it would be overwritten by its own JSON sidecar."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        raise SaliencyUsageError(
            f"saliency baseline path {path} ends in .json, the name of the baseline's metadata sidecar "
            f"({path.with_suffix('.json').name}), which would overwrite the maps. Give the baseline an .npz "
            f"name, e.g. {path.with_suffix('.npz')}; the sidecar is written beside it."
        )
    return path


def write_baseline(path: Path, maps: Any, metadata: dict[str, Any]) -> None:
    """Write ``maps`` and ``metadata`` atomically: temp file in the same folder, fsync, rename."""
    import numpy as np

    path = _checked_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metadata, sort_keys=True, indent=2)
    for target, writer in ((path, "npz"), (path.with_suffix(".json"), "json")):
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                if writer == "npz":
                    np.savez_compressed(handle, maps=maps, metadata=np.array(text))
                else:
                    handle.write(text.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def read_baseline(path: Path) -> tuple[Any, dict[str, Any]]:
    """Load maps and metadata without unpickling anything; damaged files get a clear error."""
    import numpy as np

    path = Path(path)
    fix = "Delete it and rerun with --saliency-update-baselines to write a fresh one, or restore it from version control."
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            if "maps" not in data.files or "metadata" not in data.files:
                raise SaliencyUsageError(
                    f"saliency baseline {path} is not a pytest-saliency baseline (it holds {sorted(data.files)}, "
                    f"expected 'maps' and 'metadata'). {fix}"
                )
            maps = data["maps"]
            metadata = json.loads(str(data["metadata"]))
    except SaliencyUsageError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise SaliencyUsageError(
                f"saliency baseline {path} contains pickled Python objects; it was refused and nothing in it was "
                f"executed (baselines are loaded with allow_pickle=False). {fix}"
            ) from None
        raise SaliencyUsageError(f"saliency baseline {path} could not be read ({exc}). {fix}") from None
    except Exception as exc:  # zipfile.BadZipFile, EOFError, OSError, json errors: a damaged file
        raise SaliencyUsageError(
            f"saliency baseline {path} is corrupted or truncated ({type(exc).__name__}: {exc}). {fix}"
        ) from None
    if maps.dtype.kind != "f" or maps.ndim != 3:
        raise SaliencyUsageError(
            f"saliency baseline {path} holds maps of dtype {maps.dtype} and shape {maps.shape}; expected float "
            f"maps of shape (N, H, W). {fix}"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise SaliencyUsageError(
            f"saliency baseline {path} has format version {metadata.get('format_version')!r}; this pytest-saliency "
            f"reads version {FORMAT_VERSION}. {fix}"
        )
    return maps, metadata


def _similarity(metric: str, a: Any, b: Any, pipeline: MapPipeline) -> Any:
    from .similarity import pearson, spearman, structural_similarity

    if metric == "ssim":
        return structural_similarity(a, b, **pipeline.ssim.kwargs())
    return (spearman if metric == "spearman" else pearson)(a, b)


@dataclass
class BaselineResult:
    """The comparison of current maps with a stored baseline (or the record that one was written)."""

    name: str
    path: str
    status: str  # "compared", "written" (missing: written and failed), "updated" (written on request)
    method: str
    metric: str
    threshold: float
    threshold_source: str  # "given", "default", "calibrated from N reference models"
    values: list[float]
    pipeline: MapPipeline
    n_images: int
    seed: int
    seconds: float
    reproduce: str = ""
    baseline_maps: Any = field(default=None, repr=False)
    current_maps: Any = field(default=None, repr=False)

    check = "baseline"

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")

    @property
    def passed(self) -> bool:
        if self.status == "written":
            return False
        if self.status == "updated":
            return True
        return self.mean >= self.threshold

    def worst(self, count: int = 5) -> list[tuple[int, float]]:
        return sorted(enumerate(self.values), key=lambda item: item[1])[:count]

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check, "passed": self.passed, "status": self.status, "name": self.name,
            "path": self.path, "method": self.method, "metric": self.metric, "threshold": self.threshold,
            "threshold_source": self.threshold_source, "values": self.values,
            "mean": self.mean if self.values else None,
            "worst": [{"image": i, "value": v} for i, v in self.worst()], "preset": self.pipeline.to_dict(),
            "n_images": self.n_images, "seed": self.seed, "seconds": self.seconds, "reproduce": self.reproduce,
        }

    def summary(self) -> str:
        if self.status in ("written", "updated"):
            return f"{'PASS' if self.passed else 'FAIL'} baseline [{self.method}]: {self.status} {self.path}"
        return (
            f"{'PASS' if self.passed else 'FAIL'} baseline [{self.method}, {self.metric}, {self.pipeline.name}]: "
            f"mean {self.metric} to baseline = {self.mean:.4f} vs >= {self.threshold:.4g} "
            f"({self.threshold_source}); N = {self.n_images}"
        )

    def report(self) -> str:
        lines = [
            f"  baseline:   {self.path}",
            f"  method:     {self.method}   preset: {self.pipeline.describe()}",
            f"  metric:     mean per-image {self.metric}(current, baseline) must be >= {self.threshold:.4g} "
            f"({self.threshold_source})",
        ]
        if self.values:
            lines.append(f"  observed:   mean {self.mean:.4f}, min {min(self.values):.4f} over {self.n_images} images")
            lines.append("  worst images: " + ", ".join(f"#{i} {v:.4f}" for i, v in self.worst()))
        if self.reproduce:
            lines.append(f"  reproduce:  {self.reproduce}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        if self.status == "written":
            return (
                f"Saliency baseline not found: {self.path}\n"
                f"  It has been written now from this run's {self.method} maps ({self.n_images} images); review "
                "it, commit it, and rerun: the next run compares against it.\n"
                "  To write or refresh baselines without failing: pytest --saliency --saliency-update-baselines"
            )
        return "\n".join([
            f"Saliency check failed: {self.method} maps drifted from the stored baseline "
            f"(mean {self.metric} {self.mean:.4f} < {self.threshold:.4g})",
            self.report(),
            "  what next:   if the new explanations are intended (a deliberate model change), refresh the baseline "
            "with pytest --saliency --saliency-update-baselines and commit it; after a retraining with a new seed, "
            "calibrate the threshold with reference_models=[...] (see the README).",
        ])


def _mean_pairwise(maps: list[Any], metric: str, pipeline: MapPipeline) -> float:
    values = [float(_similarity(metric, a, b, pipeline).mean()) for a, b in itertools.combinations(maps, 2)]
    return min(values)


@rng_isolated
def check_baseline(
    model: Any,
    inputs: Any,
    path: Path | str,
    method: Any = "saliency",
    *,
    metric: str = "ssim",
    threshold: float | None = None,
    reference_models: list[Any] | None = None,
    update: bool = False,
    preset: str | MapPipeline | None = None,
    target: Any = None,
    seed: int = 0,
    batch_size: int | None = None,
    name: str = "",
    reproduce: str = "",
    **method_kwargs: Any,
) -> BaselineResult:
    """Compare ``model``'s maps on ``inputs`` with the baseline at ``path``, writing it when missing.

    ``update=True`` writes (or overwrites) the baseline and passes. A missing baseline is written
    and the result fails (so a new test cannot pass by accident). ``reference_models`` calibrates
    the threshold from seed-to-seed variation when the baseline is written.
    """
    start = time.perf_counter()
    torch = require_torch()
    path = _checked_path(path)
    check_model(model)
    check_inputs(inputs, model)
    if metric not in BASELINE_METRICS:
        from ._validation import unknown_choice

        raise unknown_choice("baseline metric", metric, BASELINE_METRICS)
    pipeline = get_pipeline(preset)
    resolved, label, options = prepare_method(method, model, inputs, method_kwargs)

    fixed_target = resolve_target(model, inputs, target, batch_size, seed=seed)

    def maps_of(m: Any) -> Any:
        raw = _attribute(m, inputs, resolved, fixed_target, seed, batch_size, True, options)
        return apply_pipeline(raw, pipeline).float()

    current = maps_of(model)
    metadata = {
        "format_version": FORMAT_VERSION,
        "method": label,
        # Only what changes the maps: batching and values derived from the inputs are left out.
        "method_options": _jsonable({k: v for k, v in options.items() if k not in _DERIVED_OPTIONS and not k.startswith("_")}),
        "preset": pipeline.to_dict(),
        "input_fingerprint": input_fingerprint(inputs),
        "input_shape": list(inputs.shape),
        "target": _jsonable(target.tolist() if isinstance(target, torch.Tensor) else target),
        "seed": seed,
        "metric": metric,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    common = dict(name=name, path=str(path), method=label, metric=metric, pipeline=pipeline,
                  n_images=int(inputs.shape[0]), seed=seed, reproduce=reproduce)
    if update or not path.exists():
        source = "given" if threshold is not None else "default"
        stored_threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        if reference_models:
            for ref in reference_models:
                check_model(ref)
            envelope = _mean_pairwise([current] + [maps_of(m) for m in reference_models], metric, pipeline)
            metadata["envelope"] = {"metric": metric, "min_mean_similarity": envelope,
                                    "reference_models": len(reference_models) + 1}
            stored_threshold, source = envelope, f"calibrated from {len(reference_models) + 1} reference models"
        metadata["threshold"] = stored_threshold
        write_baseline(path, current.detach().cpu().numpy(), metadata)
        return BaselineResult(status="updated" if update else "written", threshold=stored_threshold,
                              threshold_source=source, values=[], seconds=time.perf_counter() - start,
                              current_maps=current.detach().cpu(), **common)
    stored_maps, stored = read_baseline(path)
    differences = [key for key in _MATCHED_FIELDS if stored.get(key) != metadata[key]]
    if differences:
        detail = "; ".join(f"{key}: baseline {stored.get(key)!r:.80} vs now {metadata[key]!r:.80}" for key in differences)
        raise SaliencyUsageError(
            f"saliency baseline {path} was made from different {', '.join(differences)} ({detail}). Comparing them "
            "would compare unlike things. If the change is intended, rewrite it with --saliency-update-baselines."
        )
    baseline = torch.from_numpy(stored_maps).to(current.device)
    values = _similarity(metric, current, baseline, pipeline).double().cpu().tolist()
    if threshold is not None:
        used, source = threshold, "given"
    elif "envelope" in stored:
        used = float(stored["envelope"]["min_mean_similarity"])
        source = f"calibrated from {stored['envelope']['reference_models']} reference models"
    else:
        used, source = float(stored.get("threshold", DEFAULT_THRESHOLD)), "default"
    return BaselineResult(status="compared", threshold=used, threshold_source=source, values=values,
                          seconds=time.perf_counter() - start, baseline_maps=baseline.cpu(),
                          current_maps=current.detach().cpu(), **common)
