"""Benchmark: independent parameter randomization (IPR), four ways, interleaved in one process.

    python benchmarks/bench_ipr.py [--workload NAME ...] [--rounds R] [--images N] [--device cpu|cuda]
                                   [--json out.json] [--quick] [--force] [--memory auto|all|none]
                                   [--memory-only] [--engine-defaults] [--threads T] [--profile NAME]
                                   [--phases NAME]

The ways (each does the whole IPR of one workload: original maps + one map batch per layer):

``engine``     ``pytest_saliency.layer_randomization(model, x, method, mode="independent", layers="leaf",
               preset=PRESET, seed=SEED, **options)``, as a user calls it (statistics included).
``engine_full`` the same call with ``reuse_activations=False``: every randomized state is a full captum
               call (run for the methods that reuse activations: plain gradient, IG, SmoothGrad).
``reference``  a straightforward loop written here: for each Conv/Linear/BatchNorm layer,
               ``copy.deepcopy(model)``, randomize that layer of the copy, run the captum method on the
               batch for the original model's predicted targets, post-process with
               ``pytest_saliency.maps.postprocess.apply_pipeline`` (same preset) and compare every map with
               ``skimage.metrics.structural_similarity`` (the preset's SSIM parameters, float64).
               The layer is randomized with the public ``pytest_saliency.model.randomize.randomized([(name,
               copy_layer)], "reinit", SEED)`` (Conv/Linear: ``reset_parameters()`` under the per-layer seed
               ``derive_seed(SEED, name)``; BatchNorm: gamma/beta drawn from N(mean, std) of the original;
               the layer's buffers are put back), so the randomization is identical to the engine's and
               the per-layer SSIM can be compared to 1e-5.
``quantus``    ``quantus.MPRT(layer_order="independent", similarity_func=<quantus.similarity_func.ssim,
               results wrapped in an array>)`` with an ``explain_func`` that calls the same captum
               method (only when quantus is installed; otherwise skipped with the reason printed).
``floor``      plain gradient: (L+1) forward+backward passes of the batch w.r.t. the inputs
               (``torch.autograd.grad`` of the summed target logits), nothing else, with the
               parameters' ``requires_grad`` off (as the engine has it while explaining).
               ``floor_pgrad`` is the same with parameter ``requires_grad`` on (reported; the ratios
               use ``floor``). Expensive methods (IG, SmoothGrad, occlusion): the floor is
               (L+1) x the captum call alone on the original model (median of 3 calls per round).

All four ways run captum with the same options, written out in :func:`_captum_options` (the
engine gets them as method options, so its own internal batch sizing does not change the work;
``--engine-defaults`` calls the engine with only the method's hyperparameters instead).

Per round every way runs once (the order rotates per round); one warm-up round is not counted.
Reported: median wall-clock seconds (``perf_counter``) and CPU seconds of the process
(``process_time``) per way, the median of per-round ratios, and the peak memory of each way
measured in a fresh subprocess that runs only that way once (CPU: ``VmHWM`` from
/proc/self/status, because ``ru_maxrss`` is inherited from the spawning process on Linux;
CUDA: ``torch.cuda.max_memory_allocated``). The engine's per-layer SSIM is checked against the
reference loop's (same preset, same randomization) within 1e-5; the exit status is 1 if not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples" / "digits_repo"))

import models

PRESET = "adebayo2018"
REUSING_METHODS = ("saliency", "integrated_gradients", "smoothgrad", "occlusion")  # activation_reuse, forward_reuse
SEED = 0
DATA_SEED = 1234
SSIM_TOLERANCE = 1e-5
WAYS = ("engine", "engine_full", "reference", "quantus", "floor", "floor_pgrad")

# ----------------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # key for models.build, or "digits"
    shape: tuple[int, int, int]
    method: str = "saliency"
    options: dict[str, Any] = field(default_factory=dict)
    expensive: bool = False
    gpu_only: bool = False
    images: int = 32  # N for the default run on CPU
    rounds: int = 5
    note: str = ""


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "small_cnn",
            "small_cnn3",
            (3, 32, 32),
            rounds=15,  # about 0.05 s per way: more rounds are cheap and steady the medians
            note="SmallCNN 3x32x32, seeded random init",
        ),
        Workload(
            "digits_cnn",
            "digits",
            (1, 32, 32),
            rounds=15,
            note="SmallCNN trained on sklearn digits (examples/digits_repo)",
        ),
        Workload(
            "resnet18_64",
            "resnet18",
            (3, 64, 64),
            note="ResNet-18 layout, 3x64x64, random init",
        ),
        Workload(
            "resnet18_64_ig",
            "resnet18",
            (3, 64, 64),
            "integrated_gradients",
            {"n_steps": 50},
            expensive=True,
            images=2,
            rounds=3,
            note="integrated gradients, 50 steps (gausslegendre, zero baseline)",
        ),
        Workload(
            "resnet18_64_smoothgrad",
            "resnet18",
            (3, 64, 64),
            "smoothgrad",
            {"nt_samples": 50},
            expensive=True,
            images=2,
            rounds=3,
            note="SmoothGrad, 50 samples, noise 0.15 x input range",
        ),
        Workload(
            "resnet18_64_occlusion",
            "resnet18",
            (3, 64, 64),
            "occlusion",
            {},
            expensive=True,
            images=1,
            rounds=3,
            note="occlusion, 3x8x8 window, stride 4, 16 perturbations per eval",
        ),
        Workload(
            "resnet50_224",
            "resnet50",
            (3, 224, 224),
            rounds=3,
            gpu_only=True,
            note="ResNet-50 layout, 3x224x224 (GPU runs; skipped on CPU unless --force)",
        ),
    ]
}


@dataclass
class Context:
    workload: Workload
    model: Any
    x: Any
    target: Any
    layers: list[str]
    device: Any
    options: dict[
        str, Any
    ]  # captum options actually used (engine defaults written out)


def make_context(workload: Workload, images: int, device: str) -> Context:
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(DATA_SEED)
    if workload.model == "digits":
        from digits_model import load_digits_32, load_or_train

        model = load_or_train(seed=0)
        x, _ = load_digits_32("test")
        x = x[:images]
    else:
        model = models.build(
            workload.model, seed=SEED, calibrate_shape=(32, *workload.shape)
        )
        x = torch.rand((images, *workload.shape), generator=gen)
    model = model.to(dev).eval()
    x = x.to(dev)
    with torch.no_grad():
        target = model(x).argmax(1)
    options = _captum_options(workload, x)
    return Context(workload, model, x, target, models.leaf_layers(model), dev, options)


def _captum_options(workload: Workload, x: Any) -> dict[str, Any]:
    """The captum arguments every way uses, written out (so all four do the same captum work).

    Internal batch sizes are explicit: IG's interpolation steps and SmoothGrad's samples in one
    pass over the whole batch (what captum does with ``None``), occlusion 16 perturbations per
    forward pass. The engine gets the same values as method options (see :func:`engine_kwargs`),
    so its own batch sizing (``memory_budget``) does not change the work it is compared on;
    ``--engine-defaults`` measures the engine with its defaults instead.
    """
    m, o = workload.method, workload.options
    n = x.shape[0]
    if m == "saliency":
        return {"abs": False}
    if m == "integrated_gradients":
        steps = o.get("n_steps", 50)
        return {
            "n_steps": steps,
            "method": "gausslegendre",
            "internal_batch_size": n * steps,
        }
    if m == "smoothgrad":
        input_range = float(x.max() - x.min()) or 1.0
        samples = o.get("nt_samples", 50)
        return {
            "nt_samples": samples,
            "stdevs": 0.15 * input_range,
            "nt_samples_batch_size": samples,
        }
    if m == "occlusion":
        side = max(2, round(min(x.shape[-2:]) / 8))
        stride = max(1, side // 2)
        return {
            "sliding_window_shapes": (x.shape[1], side, side),
            "strides": (1, stride, stride),
            "baselines": 0.0,
            "perturbations_per_eval": 16,
        }
    raise ValueError(m)


def engine_kwargs(ctx: Context, defaults: bool = False) -> dict[str, Any]:
    """The engine's method options for the same captum work as :func:`_captum_options`."""
    w, o = ctx.workload, ctx.options
    if defaults or w.method == "saliency":
        return dict(w.options)
    if w.method == "integrated_gradients":
        # IG's integration rule is left at the engine's default (gausslegendre, as above); the
        # engine names that option ``integration_method`` (captum's ``method`` clashes with its own).
        return {
            "n_steps": o["n_steps"],
            "baselines": "zero",
            "internal_batch_size": o["internal_batch_size"],
        }
    if w.method == "smoothgrad":
        return {
            "nt_samples": o["nt_samples"],
            "stdevs": o["stdevs"],
            "nt_samples_batch_size": o["nt_samples_batch_size"],
        }
    if w.method == "occlusion":
        return {
            "window": o["sliding_window_shapes"][-1],
            "stride": o["strides"][-1],
            "baselines": o["baselines"],
            "perturbations_per_eval": o["perturbations_per_eval"],
        }
    raise ValueError(w.method)


ENGINE_DEFAULTS = False  # set by --engine-defaults


def captum_attribute(
    model: Any, x: Any, target: Any, method: str, options: dict[str, Any]
) -> Any:
    """The captum call for one batch (what every way explains with)."""
    import captum.attr as ca

    x = x.detach()
    if method == "saliency":
        return ca.Saliency(model).attribute(x, target=target, abs=options["abs"])
    if method == "integrated_gradients":
        return ca.IntegratedGradients(model).attribute(
            x, baselines=torch.zeros_like(x), target=target, **options
        )
    if method == "smoothgrad":
        return ca.NoiseTunnel(ca.Saliency(model)).attribute(
            x, nt_type="smoothgrad", target=target, abs=False, **options
        )
    if method == "occlusion":
        return ca.Occlusion(model).attribute(x, target=target, **options)
    raise ValueError(method)


def _sync(device: Any) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# the four ways
# ----------------------------------------------------------------------------------------------


def run_engine(ctx: Context, reuse_activations: bool = True) -> dict[str, Any]:
    from pytest_saliency.checks.randomization import layer_randomization

    w = ctx.workload
    result = layer_randomization(
        ctx.model,
        ctx.x,
        w.method,
        mode="independent",
        layers="leaf",
        preset=PRESET,
        seed=SEED,
        reuse_activations=reuse_activations,
        **engine_kwargs(ctx, ENGINE_DEFAULTS),
    )
    return {"layers": list(result.layers), "ssim": result.ssim, "reused_activations": result.reused_activations}


def run_engine_full(ctx: Context) -> dict[str, Any]:
    """The engine with ``reuse_activations=False``: every state is a full captum call."""
    return run_engine(ctx, reuse_activations=False)


def run_reference(ctx: Context) -> dict[str, Any]:
    from skimage.metrics import structural_similarity

    from pytest_saliency.core.rng import seeded
    from pytest_saliency.maps.postprocess import apply_pipeline, get_pipeline
    from pytest_saliency.model.randomize import randomized as randomized_layers

    pipeline = get_pipeline(PRESET)
    p = pipeline.ssim
    model, x, method = ctx.model, ctx.x, ctx.workload.method

    def maps(net: Any) -> Any:
        # seeded() only matters for SmoothGrad's noise: the same draws as the engine's.
        with seeded(SEED, x.device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = captum_attribute(net, x, target, method, ctx.options)
        return apply_pipeline(raw.detach(), pipeline).double().cpu().numpy()

    with torch.no_grad():
        target = model(x).argmax(1)
    original = maps(model)
    rows = {}
    for name in ctx.layers:
        net = copy.deepcopy(model)
        # Randomizes the layer in the copy and puts its buffers back (reset_parameters() also resets
        # BatchNorm's running statistics), as the engine's states have it.
        with randomized_layers([(name, net.get_submodule(name))], "reinit", SEED):
            randomized = maps(net)
        rows[name] = [
            float(
                structural_similarity(
                    a,
                    b,
                    win_size=p.win_size,
                    gaussian_weights=p.gaussian_weights,
                    sigma=p.sigma,
                    data_range=p.data_range,
                    K1=p.K1,
                    K2=p.K2,
                    use_sample_covariance=p.use_sample_covariance,
                )
            )
            for a, b in zip(original, randomized)
        ]
        del net
    return {"layers": list(rows), "ssim": [rows[n] for n in rows]}


def quantus_available() -> tuple[bool, str]:
    try:
        import quantus  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (ImportError, or a broken optional dependency: cv2, pandas, ...)
        return (
            False,
            f"quantus not importable ({type(exc).__name__}: {exc}); pip install quantus --no-deps, see RESULTS.md",
        )
    return True, ""


def run_quantus(ctx: Context) -> dict[str, Any]:
    import numpy as np
    import quantus

    model, method, options = ctx.model, ctx.workload.method, ctx.options

    def explain_func(model: Any, inputs: Any, targets: Any, **kwargs: Any) -> Any:
        dev = next(model.parameters()).device
        xt = torch.as_tensor(inputs, device=dev)
        yt = torch.as_tensor(targets, device=dev).long()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = captum_attribute(model, xt, yt, method, options)
        return a.sum(dim=1, keepdim=True).detach().cpu().numpy()

    x_np = ctx.x.detach().cpu().numpy()
    with torch.no_grad():
        y_np = model(ctx.x).argmax(1).cpu().numpy()

    def ssim_array(a: Any, b: Any, batched: bool = False, **kwargs: Any) -> Any:
        # quantus 0.6.0: similarity_func.ssim returns a list when batched, but MPRT calls .tolist()
        # on the result; wrapping it in an array is the smallest change that runs.
        return np.asarray(quantus.similarity_func.ssim(a, b, batched=batched, **kwargs))

    metric = quantus.MPRT(
        layer_order="independent",
        similarity_func=ssim_array,
        seed=SEED,
        abs=True,
        normalise=True,
        disable_warnings=True,
        display_progressbar=False,
    )
    with warnings.catch_warnings(), _rng_kept():
        warnings.simplefilter("ignore")
        scores = metric(
            model=model,
            x_batch=x_np,
            y_batch=y_np,
            a_batch=None,
            explain_func=explain_func,
            channel_first=True,
            device=str(ctx.device),
            batch_size=int(x_np.shape[0]),
        )
    return {
        "layers": [k for k in scores if k != "original"],
        "mean": {k: float(np.mean(v)) for k, v in scores.items()},
    }


@contextlib.contextmanager
def _rng_kept():
    """Quantus reseeds the global torch RNG per layer; keep this process's RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        yield


def _floor_passes(ctx: Context, passes: int, param_grads: bool) -> None:
    model, x, target = ctx.model, ctx.x, ctx.target
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(param_grads)
    try:
        for _ in range(passes):
            xi = x.detach().requires_grad_(True)
            out = model(xi)
            (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xi)
            del grad, out
        _sync(ctx.device)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def run_floor(ctx: Context) -> dict[str, Any]:
    states = len(ctx.layers) + 1
    if ctx.workload.method == "saliency":
        _floor_passes(ctx, states, param_grads=False)
        return {}
    # Expensive methods: (L+1) x the captum call alone on the original model (parameter grads off);
    # the call is timed 3 times per round and the median is scaled, so one noisy call is not
    # multiplied by L+1.
    params = list(ctx.model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    walls, cpus = [], []
    try:
        from pytest_saliency.core.rng import seeded

        for _ in range(3):
            with seeded(SEED, ctx.x.device), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wall, cpu = time.perf_counter(), time.process_time()
                captum_attribute(
                    ctx.model, ctx.x, ctx.target, ctx.workload.method, ctx.options
                )
                _sync(ctx.device)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return {
        "seconds": statistics.median(walls) * states,
        "cpu_seconds": statistics.median(cpus) * states,
    }


def run_floor_pgrad(ctx: Context) -> dict[str, Any]:
    """The saliency floor with parameter requires_grad on; on big models measured on <= 8 passes, scaled."""
    states = len(ctx.layers) + 1
    passes = min(states, 8)
    wall, cpu = time.perf_counter(), time.process_time()
    _floor_passes(ctx, passes, param_grads=True)
    scale = states / passes
    return {
        "seconds": (time.perf_counter() - wall) * scale,
        "cpu_seconds": (time.process_time() - cpu) * scale,
    }


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "engine": run_engine,
    "engine_full": run_engine_full,
    "reference": run_reference,
    "quantus": run_quantus,
    "floor": run_floor,
    "floor_pgrad": run_floor_pgrad,
}

# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------


def _timed(
    fn: Callable[[Context], dict[str, Any]], ctx: Context
) -> tuple[float, float, dict[str, Any]]:
    """Wall seconds (perf_counter) and CPU seconds of this process, all threads (process_time).

    The minor page faults of the call (``resource`` ``ru_minflt``) go into the output as
    ``"minor_faults"``: on the small CNNs they decide how far apart two runs of the same code land.
    """
    gc.collect()
    _sync(ctx.device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(ctx)
    _sync(ctx.device)
    elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu
    out["minor_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return (
        float(out.pop("seconds", elapsed)),
        float(out.pop("cpu_seconds", cpu_elapsed)),
        out,
    )


def ssim_check(engine: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    ref = dict(zip(reference["layers"], reference["ssim"]))
    worst_mean, worst_image = 0.0, 0.0
    for name, row in zip(engine["layers"], engine["ssim"]):
        other = ref[name]
        worst_mean = max(
            worst_mean, abs(statistics.fmean(row) - statistics.fmean(other))
        )
        worst_image = max(worst_image, max(abs(a - b) for a, b in zip(row, other)))
    same_layers = sorted(engine["layers"]) == sorted(reference["layers"])
    return {
        "layers_equal": same_layers,
        "max_abs_diff_layer_mean": worst_mean,
        "max_abs_diff_per_image": worst_image,
        "tolerance": SSIM_TOLERANCE,
        "passed": bool(same_layers and worst_mean <= SSIM_TOLERANCE),
    }


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise KeyError(key)


def memory_child(
    workload: Workload, way: str, images: int, device: str
) -> dict[str, Any]:
    """Run one way once in this (fresh) process and report its peak memory."""
    import captum.attr  # noqa: F401  (same imports in every child, so baselines are comparable)
    import skimage.metrics  # noqa: F401

    import pytest_saliency  # noqa: F401

    if way == "quantus":
        import quantus  # noqa: F401
    ctx = make_context(workload, images, device)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    rss_now = _proc_status_mb("VmRSS")
    RUNNERS[way](ctx)
    _sync(ctx.device)
    report = {
        "baseline_rss_mb": rss_now,
        # VmHWM: this process's peak resident set. ru_maxrss is kept for reference only: on Linux
        # it is inherited through fork/vfork + exec (a child reports at least its parent's peak at
        # spawn time, here the benchmark process's), so it cannot isolate one way.
        "peak_rss_mb": _proc_status_mb("VmHWM"),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if ctx.device.type == "cuda":
        report["cuda_baseline_mb"] = base_cuda / 2**20
        report["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return report


def measure_memory(
    workload: Workload, ways: list[str], images: int, device: str
) -> dict[str, Any]:
    out = {}
    for way in ways:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_memory-child",
            way,
            "--workload",
            workload.name,
            "--images",
            str(images),
            "--device",
            device,
            "--threads",
            str(torch.get_num_threads()),
        ] + (["--engine-defaults"] if ENGINE_DEFAULTS else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            out[way] = {
                "error": proc.stderr.strip().splitlines()[-1]
                if proc.stderr.strip()
                else f"rc={proc.returncode}"
            }
            continue
        out[way] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def bench_workload(
    workload: Workload,
    rounds: int,
    images: int,
    device: str,
    ways: list[str],
    memory: bool,
    warmup: int = 1,
) -> dict[str, Any]:
    ctx = make_context(workload, images, device)
    L = len(ctx.layers)
    load_start = os.getloadavg()[0]
    print(
        f"\n== {workload.name}: {workload.note}; N = {images}, L = {L}, rounds = {rounds} (+{warmup} warm-up); "
        f"load average {load_start:.2f}",
        flush=True,
    )
    times: dict[str, list[float]] = {w: [] for w in ways}
    cpu_times: dict[str, list[float]] = {w: [] for w in ways}
    faults: dict[str, list[int]] = {w: [] for w in ways}
    first: dict[str, dict[str, Any]] = {}
    for r in range(warmup + rounds):
        order = ways[r % len(ways) :] + ways[: r % len(ways)]
        line = []
        for way in order:
            seconds, cpu_seconds, out = _timed(RUNNERS[way], ctx)
            minor_faults = out.pop("minor_faults")
            first.setdefault(way, out)
            if r >= warmup:
                times[way].append(seconds)
                cpu_times[way].append(cpu_seconds)
                faults[way].append(minor_faults)
            line.append(f"{way} {seconds:.3f}s (cpu {cpu_seconds:.3f}s)")
        print(
            f"  round {r + 1 - warmup if r >= warmup else 'warm-up'}: "
            + ", ".join(line),
            flush=True,
        )

    def ratios(a: str, b: str, table: dict[str, list[float]] = times) -> float | None:
        if a not in table or b not in table:
            return None
        return statistics.median(x / y for x, y in zip(table[a], table[b]))

    pairs = {
        "engine_over_floor": ("engine", "floor"),
        "engine_full_over_floor": ("engine_full", "floor"),
        "reference_over_engine": ("reference", "engine"),
        "quantus_over_engine": ("quantus", "engine"),
        "floor_pgrad_over_floor": ("floor_pgrad", "floor"),
        "reference_over_floor": ("reference", "floor"),
        "quantus_over_floor": ("quantus", "floor"),
    }

    summary = {
        "workload": workload.name,
        "note": workload.note,
        "method": workload.method,
        "images": images,
        "layers": L,
        "rounds": rounds,
        "warmup": warmup,
        "device": device,
        "captum_options": {k: repr(v) for k, v in ctx.options.items()},
        "engine_options": {
            k: repr(v) for k, v in engine_kwargs(ctx, ENGINE_DEFAULTS).items()
        },
        "load_average_start_end": [load_start, os.getloadavg()[0]],
        "median_s": {w: statistics.median(t) for w, t in times.items()},
        "times_s": times,
        "median_cpu_s": {w: statistics.median(t) for w, t in cpu_times.items()},
        "cpu_times_s": cpu_times,
        "median_minor_faults": {w: statistics.median(f) for w, f in faults.items()},
        **{f"ratio_{k}": ratios(a, b) for k, (a, b) in pairs.items()},
        **{f"cpu_ratio_{k}": ratios(a, b, cpu_times) for k, (a, b) in pairs.items()},
    }
    if "engine" in first and "reference" in first:
        summary["ssim_check"] = ssim_check(first["engine"], first["reference"])
        print(f"  SSIM engine vs reference: {summary['ssim_check']}", flush=True)
    if "quantus" in first:
        summary["quantus_layers"] = len(first["quantus"]["layers"])
    if memory:
        mem_ways = [w for w in ways if w != "floor_pgrad"]
        summary["memory"] = measure_memory(workload, mem_ways, images, device)
        print(f"  memory: {summary['memory']}", flush=True)
    del ctx
    gc.collect()
    return summary


def environment() -> dict[str, Any]:
    import captum
    import numpy
    import skimage

    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "captum": captum.__version__,
        "skimage": skimage.__version__,
        "numpy": numpy.__version__,
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "pytest_saliency").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    env["pytest_saliency_sources_sha256"] = digest.hexdigest()[
        :16
    ]  # which engine was measured
    ok, _ = quantus_available()
    if ok:
        import quantus

        env["quantus"] = getattr(quantus, "__version__", "?")
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_tables(results: list[dict[str, Any]]) -> None:
    for label, med, pre in (
        ("wall-clock (perf_counter)", "median_s", "ratio_"),
        ("CPU time of this process (process_time)", "median_cpu_s", "cpu_ratio_"),
    ):
        print(f"\n{label}: medians in seconds, ratios = median of per-round ratios")
        print(
            "| workload | N | L | engine | engine, no reuse | reference | quantus | floor | floor, param grads on "
            "| engine/floor | no reuse/floor | reference/engine | quantus/engine | reference/floor | quantus/floor |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in results:
            m = s[med]
            print(
                f"| {s['workload']} | {s['images']} | {s['layers']} | {_fmt(m.get('engine'), 3)} "
                f"| {_fmt(m.get('engine_full'), 3)} | {_fmt(m.get('reference'), 3)} "
                f"| {_fmt(m.get('quantus'), 3)} | {_fmt(m.get('floor'), 3)} | {_fmt(m.get('floor_pgrad'), 3)} "
                f"| {_fmt(s[pre + 'engine_over_floor'], 3)} | {_fmt(s[pre + 'engine_full_over_floor'], 3)} "
                f"| {_fmt(s[pre + 'reference_over_engine'])} "
                f"| {_fmt(s[pre + 'quantus_over_engine'])} | {_fmt(s[pre + 'reference_over_floor'])} "
                f"| {_fmt(s[pre + 'quantus_over_floor'])} |"
            )
    print(
        "\n| workload | SSIM check: engine vs reference | max abs diff of layer means | max abs diff per image "
        "| load average start/end | minor page faults per run (median) |"
    )
    print("|---|---|---|---|---|---|")
    for s in results:
        chk = s.get("ssim_check")
        load = "/".join(f"{v:.1f}" for v in s["load_average_start_end"])
        faults = ", ".join(f"{w} {f:.0f}" for w, f in s.get("median_minor_faults", {}).items())
        if chk is None:
            print(f"| {s['workload']} | - | - | - | {load} | {faults} |")
        else:
            print(
                f"| {s['workload']} | {'pass' if chk['passed'] else 'FAIL'} (tol {chk['tolerance']:g}) "
                f"| {chk['max_abs_diff_layer_mean']:.1e} | {chk['max_abs_diff_per_image']:.1e} | {load} | {faults} |"
            )
    print_memory_table(results)


def print_memory_table(results: list[dict[str, Any]]) -> None:
    if any("memory" in s for s in results):
        print(
            "\n| workload | N | way | peak RSS (VmHWM) MB | RSS after setup MB | peak - setup MB | peak / floor's peak | CUDA peak MB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for s in results:
            for way, r in s.get("memory", {}).items():
                if "error" in r:
                    print(
                        f"| {s['workload']} | {s['images']} | {way} | error: {r['error']} | | | | |"
                    )
                    continue
                floor_peak = s["memory"].get("floor", {}).get("peak_rss_mb")
                rel = _fmt(r["peak_rss_mb"] / floor_peak, 3) if floor_peak else "-"
                print(
                    f"| {s['workload']} | {s['images']} | {way} | {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} "
                    f"| {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {rel} | {_fmt(r.get('cuda_peak_mb'), 0)} |"
                )


def profile_engine(workload: Workload, images: int, device: str, top: int) -> None:
    import cProfile
    import pstats

    ctx = make_context(workload, images, device)
    run_engine(ctx)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    run_engine(ctx)
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("cumulative").print_stats(top)
    print("\n--- entries outside torch/ (cumulative) ---")
    stats.sort_stats("cumulative").print_stats(r"^(?!.*[/\\]torch[/\\]).*$", top)
    print("\n--- own time (tottime; on a GPU, waits for the device land where results are read) ---")
    stats.sort_stats("tottime").print_stats(top)


def time_phases(workload: Workload, images: int, device: str, rounds: int) -> None:
    """Mean time of each engine phase per check, the floor timed alongside (``--phases``).

    The functions the engine calls a few times per check are wrapped with a timer in place;
    "rest" is the check's time outside them (validation, the SSIM setup, building the result).
    """
    import contextlib
    import functools

    from pytest_saliency.checks import randomization as engine
    from pytest_saliency.engine import base as engine_base
    from pytest_saliency.engine import replay as activation_reuse
    from pytest_saliency.engine import select as engine_select

    ctx = make_context(workload, images, device)
    phases = [
        (engine, "prepare_method", "method preparation (memory-budget probe: a 1-image forward)"),
        (engine_select, "trace_forward", "traced forward pass (when it is not the recording pass)"),
        (activation_reuse.GradientReplay, "record", "recorded forward pass (traced, graph kept)"),
        (activation_reuse.GradientReplay, "original", "original backward (graph kept)"),
        (activation_reuse.GradientReplay, "verify", "verifying the replay (forward from the largest cut)"),
        (activation_reuse.GradientReplay, "maps", "randomized states, replayed (forward + two-stage backward)"),
        (engine_base, "attribute", "captum calls (original and states without reuse)"),
        (engine_base, "randomized", "randomizing and restoring the layers"),
        (engine._Comparison, "flush", "post-processing + SSIM, batched over states"),
        (engine, "check_finite", "finiteness checks"),
        (engine, "sensitivity_statistics", "bootstrap statistics"),
    ]
    spent = {label: 0.0 for _, _, label in phases}
    originals = []

    def timer(inner: Any, label: str) -> Any:
        if label.startswith("randomizing"):  # a context manager: time entering and leaving it
            @contextlib.contextmanager
            def managed(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                with inner(*args, **kwargs):
                    spent[label] += time.perf_counter() - start
                    yield
                    start = time.perf_counter()
                spent[label] += time.perf_counter() - start

            return managed

        @functools.wraps(inner)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                _sync(ctx.device)
                spent[label] += time.perf_counter() - start

        return wrapper

    for owner, name, label in phases:
        originals.append((owner, name, getattr(owner, name)))
        setattr(owner, name, timer(getattr(owner, name), label))
    try:
        run_engine(ctx)
        run_floor(ctx)  # warm-up
        spent = dict.fromkeys(spent, 0.0)
        engine_time = floor_time = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            run_engine(ctx)
            engine_time += time.perf_counter() - start
            start = time.perf_counter()
            run_floor(ctx)
            floor_time += time.perf_counter() - start
    finally:
        for owner, name, inner in originals:
            setattr(owner, name, inner)
    ms = 1000.0 / rounds
    print(f"{workload.name}: engine {engine_time * ms:.1f} ms, floor {floor_time * ms:.1f} ms per check "
          f"(ratio of sums {engine_time / floor_time:.3f}), {rounds} rounds")
    print("| phase | ms per check |\n|---|---|")
    for label, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        if seconds:
            print(f"| {label} | {seconds * ms:.1f} |")
    print(f"| rest of the check | {(engine_time - sum(spent.values())) * ms:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workload",
        nargs="+",
        choices=sorted(WORKLOADS),
        help="default: every CPU workload",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="timed rounds (default: 5 for plain gradient, 3 for IG / SmoothGrad / occlusion / ResNet-50)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="warm-up rounds, not counted (default 1; 0 with --quick)",
    )
    parser.add_argument(
        "--images",
        type=int,
        help="N images (default 32; on the CPU 2 for IG and SmoothGrad and 1 for occlusion, to fit 15 minutes)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument(
        "--json", type=Path, help="write every number to this JSON file"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 round, no warm-up, N = 8 (1 for expensive), no memory",
    )
    parser.add_argument(
        "--force", action="store_true", help="run GPU-only workloads on the CPU too"
    )
    parser.add_argument(
        "--memory",
        choices=["auto", "all", "none"],
        default="auto",
        help="per-way peak-memory subprocesses: auto = plain-gradient workloads only (default), all, none",
    )
    parser.add_argument(
        "--engine-defaults",
        action="store_true",
        help="call the engine with only the method's hyperparameters (its own internal batch sizing) instead "
        "of the captum options the other ways use",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the peak-memory subprocesses, no timing",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads (default: torch's own choice)",
    )
    parser.add_argument(
        "--profile",
        choices=sorted(WORKLOADS),
        help="cProfile the engine on one workload and exit",
    )
    parser.add_argument("--top", type=int, default=40, help="rows printed by --profile")
    parser.add_argument(
        "--phases",
        choices=sorted(WORKLOADS),
        help="time the engine's phases on one workload (with the floor alongside) and exit",
    )
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    global ENGINE_DEFAULTS
    ENGINE_DEFAULTS = args.engine_defaults
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    if args.memory_child:
        workload = WORKLOADS[args.workload[0]]
        print(
            json.dumps(
                memory_child(workload, args.memory_child, args.images, args.device)
            )
        )
        return 0

    def images_for(w: Workload) -> int:
        if args.images:
            return args.images
        if args.quick:
            return 1 if w.expensive else 8
        return 32 if args.device == "cuda" else w.images

    if args.profile:
        w = WORKLOADS[args.profile]
        profile_engine(w, images_for(w), args.device, args.top)
        return 0
    if args.phases:
        w = WORKLOADS[args.phases]
        time_phases(w, images_for(w), args.device, args.rounds or 30)
        return 0

    names = args.workload or [
        n for n, w in WORKLOADS.items() if not w.gpu_only or args.device == "cuda"
    ]
    ways = list(args.ways)
    if "quantus" in ways:
        ok, reason = quantus_available()
        if not ok:
            print(f"skipping the quantus column: {reason}")
            ways.remove("quantus")
    env = environment()
    print("environment:", json.dumps(env))
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    start = time.perf_counter()
    results = []
    for name in names:
        w = WORKLOADS[name]
        if w.gpu_only and args.device != "cuda" and not args.force:
            print(
                f"\n== {name}: skipped (GPU workload; pass --device cuda, or --force to run it on the CPU)"
            )
            continue
        w_ways = [
            x for x in ways
            # the param-grad floor is for plain gradients; the engine without activation reuse
            # differs from the engine only for the methods that reuse activations
            if not (x == "floor_pgrad" and w.method != "saliency")
            and not (x == "engine_full" and w.method not in REUSING_METHODS)
        ]
        if args.memory_only:
            mem = measure_memory(
                w, [x for x in w_ways if x != "floor_pgrad"], images_for(w), args.device
            )
            print(f"  {name}: {mem}", flush=True)
            results.append({"workload": name, "images": images_for(w), "memory": mem})
            continue
        rounds = args.rounds or (1 if args.quick else w.rounds)
        results.append(
            bench_workload(
                w,
                rounds,
                images_for(w),
                args.device,
                w_ways,
                memory=not args.quick
                and (
                    args.memory == "all"
                    or (args.memory == "auto" and w.method == "saliency")
                ),
                warmup=args.warmup
                if args.warmup is not None
                else (0 if args.quick else 1),
            )
        )
    total = time.perf_counter() - start
    if args.memory_only:
        print_memory_table(results)
    else:
        print_tables(results)
    print(f"\ntotal wall time: {total:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "argv": sys.argv,
                    "total_s": total,
                    "results": results,
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")
    failed = [
        s["workload"]
        for s in results
        if s.get("ssim_check") and not s["ssim_check"]["passed"]
    ]
    if failed:
        print(f"SSIM check FAILED for: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
