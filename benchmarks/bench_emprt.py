"""Benchmark: efficient MPRT (eMPRT), the fast randomization gate, against the per-layer audit and Quantus.

    python benchmarks/bench_emprt.py [--rounds R] [--images N] [--no-reuse] [--skip-timing] [--skip-quantus]
                                     [--json out.json]

1. **Timing** (CPU): ``efficient_randomization`` (2 explanation passes: the original model and
   every layer randomized at once) against ``layer_randomization(mode="independent")`` (IPR:
   L + 1 passes, with the engine's activation reuse on, as a user runs it; and, on the digits CNN
   and with ``--no-reuse`` on the ResNet, off: every state a full captum call), plain gradients, on the ResNet-18 layout of ``benchmarks/models.py``
   (41 leaf layers, 3x64x64 inputs, random init, BatchNorm statistics calibrated) and on the
   trained digits CNN (6 layers). One warm-up round, then ``--rounds`` rounds with the order of
   the ways rotating; per round the ratio IPR / eMPRT; reported: the median time per way, the
   median ratio and the ratio's range over the rounds, and the load average (the VM is shared, so
   single times move).

2. **Quantus cross-check** (``quantus==0.6.0``, the ``bench`` extra; skipped with the reason
   when it is not importable). Same model, inputs, targets (the original model's predictions)
   and captum call: ``explain_func`` returns ``|saliency|`` summed over channels, so Quantus's
   ``abs=True`` and our pipeline (``|a|``, channel sum, no normalization) give the same maps.
   ``quantus.EfficientMPRT(abs=True, normalise=False, complexity_func_kwargs={"n_bins": 100},
   skip_layers=True, layer_order="bottom_up", seed=SEED)`` is compared with:

   * the original maps' entropies of ``efficient_randomization`` (same pipeline): equal to
     ``TOLERANCE`` (1e-12 nats: the histograms are numpy's exactly, only the summation order of
     the entropy differs);
   * our :func:`pytest_saliency.compare.complexity.discrete_entropy` of the maps of Quantus's
     fully randomized model, rebuilt as Quantus builds it (a deep copy, ``reset_parameters()`` of
     every module that has one, in ``named_modules()`` order, each after
     ``torch.manual_seed(seed + 1)``): entropies and per-input scores ``(b - a) / a`` equal to
     ``TOLERANCE``.

   Our check randomizes with its own per-layer seeds (``derive_seed(seed, name)``, the same
   draws as ``layer_randomization``), so its H_rand is not Quantus's; both means are printed.
   Also run: Quantus with its code defaults (``abs=False``: signed maps; the docstring says
   True), against our signed pipeline; and Quantus's bin rules on these maps (``n`` = number
   of axes, not of values).

Conventions where Quantus differs, and why ours are chosen, are printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples" / "digits_repo"))

import models

from pytest_saliency.checks.efficient_randomization import efficient_randomization
from pytest_saliency.checks.randomization import layer_randomization
from pytest_saliency.compare.complexity import discrete_entropy
from pytest_saliency.maps.explainers import explain
from pytest_saliency.maps.postprocess import MapPipeline

SEED = 0
DATA_SEED = 1234
TOLERANCE = 1e-12
#: The maps Quantus's EfficientMPRT(abs=True, normalise=False) bins: |a| summed over channels.
ABS_SUM = MapPipeline(name="abs_sum", absolute=True, reduce="sum", normalize="none")
#: Quantus's code defaults (abs=False, normalise=False) with a channel-summing explain_func.
SIGNED_SUM = MapPipeline(name="signed_sum", absolute=False, reduce="sum", normalize="none")

CONVENTIONS = """\
Where Quantus 0.6.0's EfficientMPRT differs, and what pytest-saliency does:
* abs/normalise: the code defaults are abs=False, normalise=False (the docstring says True). Signed
  maps mix the sign into the histogram. Ours: the preset's pipeline (default adebayo2018: |a|, channel
  sum, 99th-percentile clip to [0, 1]); the entropy ignores positive affine rescaling, so only |a| and
  the clip matter. With the same pipeline the numbers are Quantus's exactly (above).
* n_bins rules: every Quantus rule uses n = a_batch[0].ndim (the number of axes, 3 for (1, H, W) maps)
  instead of the number of values, clipped to [10, 200], one count for the whole data set. Ours: a
  fixed count (default 100, Quantus's default) or sturges/rice/sqrt of each map's number of values;
  no spread-based rules (they would give the two states different bin counts).
* zero guard: Quantus divides by H_orig with no guard (a constant map gives inf or nan). Ours:
  constant_maps="error" (refuse) or "skip" (leave out, warn).
* verdict: Quantus returns scores only. Ours: pass when the 90% bootstrap CI's lower bound of the
  mean rise is above rise_threshold (default 0.01).
* randomization: Quantus reseeds the global torch RNG with seed + 1 before every reset_parameters
  (each layer the same stream) and resets BatchNorm to the identity. Ours: a per-layer seed
  derive_seed(seed, name) in a local generator, the same draws as layer_randomization; BatchNorm's
  affine parameters drawn around the trained ones, running statistics kept.
* cost: without a_batch, Quantus explains the original model twice (custom_preprocess explains the
  data set, then H_orig is computed from a fresh explanation) and predicts the full data set unbatched
  in both states for its model-output entropy; ours explains each state once.
"""


def _resnet(images: int) -> tuple[torch.nn.Module, torch.Tensor]:
    model = models.build("resnet18", seed=SEED, calibrate_shape=(32, 3, 64, 64))
    x = torch.rand((images, 3, 64, 64), generator=torch.Generator().manual_seed(DATA_SEED))
    return model, x


def _digits(images: int) -> tuple[torch.nn.Module, torch.Tensor]:
    from digits_model import load_digits_32, load_or_train

    model = load_or_train(seed=0)
    x, _ = load_digits_32("test")
    return model, x[:images]


# ----------------------------------------------------------------------------------------------
# 1. timing


def _ways(model: torch.nn.Module, x: torch.Tensor, no_reuse: bool) -> dict[str, Any]:
    ways = {
        "emprt": lambda: efficient_randomization(model, x, "saliency", seed=SEED),
        "ipr": lambda: layer_randomization(model, x, "saliency", mode="independent", seed=SEED),
    }
    if no_reuse:
        ways["ipr_no_reuse"] = lambda: layer_randomization(model, x, "saliency", mode="independent", seed=SEED,
                                                           reuse_activations=False)
    return ways


def _cell(summary: dict[str, Any], way: str, what: str) -> str:
    if way not in summary["median_s"]:
        return "-"
    if what == "time":
        return f"{summary['median_s'][way]:.3f}"
    key = f"{way}_over_emprt"
    low, high = summary["ratio_range"][key]
    return f"{summary['ratio_median'][key]:.1f} ({low:.1f}-{high:.1f})"


def time_workload(name: str, model: torch.nn.Module, x: torch.Tensor, rounds: int,
                  no_reuse: bool = True) -> dict[str, Any]:
    ways = _ways(model, x, no_reuse)
    for run in ways.values():  # warm-up
        run()
    times: dict[str, list[float]] = {way: [] for way in ways}
    order = list(ways)
    for r in range(rounds):
        for way in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            ways[way]()
            times[way].append(time.perf_counter() - start)
    layers = len(efficient_randomization(model, x, "saliency", seed=SEED).layers)
    ratios = {f"{way}_over_emprt": [t / e for t, e in zip(times[way], times["emprt"])] for way in ways if way != "emprt"}
    summary = {
        "workload": name, "images": int(x.shape[0]), "layers": layers, "rounds": rounds,
        "median_s": {way: statistics.median(t) for way, t in times.items()},
        "ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
        "ratio_range": {k: [min(v), max(v)] for k, v in ratios.items()},
        "times_s": times,
    }
    print(f"| {name} | {x.shape[0]} | {layers} | {_cell(summary, 'emprt', 'time')} | {_cell(summary, 'ipr', 'time')} "
          f"| {_cell(summary, 'ipr_no_reuse', 'time')} | {_cell(summary, 'ipr', 'ratio')} "
          f"| {_cell(summary, 'ipr_no_reuse', 'ratio')} | {os.getloadavg()[0]:.1f} |", flush=True)
    return summary


# ----------------------------------------------------------------------------------------------
# 2. Quantus


def quantus_available() -> tuple[bool, str]:
    try:
        import quantus
    except Exception as exc:
        return False, (f"quantus not importable ({type(exc).__name__}: {exc}); pip install --no-deps "
                       "quantus==0.6.0 pandas cachetools opencv-python-headless")
    return True, ""


def _explain_func(absolute: bool):
    def explain_func(model: Any, inputs: Any, targets: Any, **kwargs: Any) -> Any:
        import captum.attr as ca

        xt = torch.as_tensor(inputs)
        yt = torch.as_tensor(targets).long()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = ca.Saliency(model).attribute(xt, target=yt, abs=False)
        a = a.abs() if absolute else a
        return a.sum(dim=1, keepdim=True).detach().cpu().numpy()

    return explain_func


def quantus_model(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Quantus's fully randomized model (skip_layers=True), rebuilt: a deep copy, every module with
    reset_parameters reset in named_modules() order, each after torch.manual_seed(seed + 1)."""
    random_model = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        for _, module in random_model.named_modules():
            if hasattr(module, "reset_parameters"):
                torch.manual_seed(seed + 1)
                module.reset_parameters()
    return random_model.eval()


def run_quantus(model: torch.nn.Module, x: torch.Tensor, absolute: bool) -> Any:
    import quantus

    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    metric = quantus.EfficientMPRT(
        abs=absolute, normalise=False, complexity_func_kwargs={"n_bins": 100}, skip_layers=True,
        layer_order="bottom_up", seed=SEED, disable_warnings=True, display_progressbar=False,
    )
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        scores = metric(model=model, x_batch=x.numpy(), y_batch=y, a_batch=None, explain_func=_explain_func(absolute),
                        channel_first=True, device="cpu", batch_size=int(x.shape[0]))
    by_layer = metric.explanation_scores_by_layer
    return np.asarray(by_layer["orig"]), np.asarray(list(by_layer.values())[-1]), np.asarray(scores)


def cross_check(name: str, model: torch.nn.Module, x: torch.Tensor, absolute: bool = True) -> dict[str, Any]:
    pipeline = ABS_SUM if absolute else SIGNED_SUM
    start = time.perf_counter()
    q_orig, q_rand, q_scores = run_quantus(model, x, absolute)
    quantus_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = efficient_randomization(model, x, "saliency", preset=pipeline, seed=SEED, rise_threshold=0.0)
    ours_s = time.perf_counter() - start
    with torch.no_grad():
        target = model(x).argmax(1)
    rebuilt = quantus_model(model, SEED)
    h_rand = discrete_entropy(explain(rebuilt, x, "saliency", target=target, preset=pipeline)).numpy()
    h_orig = np.asarray(ours.entropy_original)
    rise = (h_rand - h_orig) / h_orig
    row = {
        "workload": name, "images": int(x.shape[0]), "abs": absolute,
        "max_diff_h_orig": float(np.abs(h_orig - q_orig).max()),
        "max_diff_h_rand_quantus_state": float(np.abs(h_rand - q_rand).max()),
        "max_diff_score_quantus_state": float(np.abs(rise - q_scores).max()),
        "quantus_mean_score": float(q_scores.mean()), "our_mean_rise_quantus_state": float(rise.mean()),
        "our_check_mean_rise": ours.mean_rise, "our_check_ci": [ours.ci_low, ours.ci_high],
        "mean_h_orig": float(h_orig.mean()), "quantus_mean_h_rand": float(q_rand.mean()),
        "our_check_mean_h_rand": ours.mean_entropy_randomized, "quantus_s": quantus_s, "our_check_s": ours_s,
    }
    row["equal"] = max(row["max_diff_h_orig"], row["max_diff_h_rand_quantus_state"],
                       row["max_diff_score_quantus_state"]) <= TOLERANCE
    print(f"| {name} | {x.shape[0]} | {'abs' if absolute else 'signed'} | {row['max_diff_h_orig']:.1e} "
          f"| {row['max_diff_h_rand_quantus_state']:.1e} | {row['max_diff_score_quantus_state']:.1e} "
          f"| {row['quantus_mean_score']:.4f} | {row['our_check_mean_rise']:.4f} ({ours.ci_low:.4f}-{ours.ci_high:.4f}) "
          f"| {quantus_s:.2f} | {ours_s:.2f} | {'yes' if row['equal'] else 'NO'} |", flush=True)
    return row


def quantus_bin_rules(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """What Quantus's n_bins rules give on these maps (n = number of axes), against ours (n = values)."""
    from quantus.functions import n_bins_func

    from pytest_saliency.compare.complexity import bin_counts

    a = explain(model, x, "saliency", preset=ABS_SUM)[:, None].numpy()  # (N, 1, H, W), as Quantus holds them
    values = int(np.prod(a.shape[1:]))
    rows = {}
    for ours, theirs in (("sturges", "sturges_formula"), ("rice", "rice_rule"), ("sqrt", "square_root_choice")):
        raw = int(getattr(n_bins_func, theirs)(a_batch=a))
        rows[ours] = {"quantus_raw": raw, "quantus_clipped": min(max(raw, 10), 200),
                      "ours": int(bin_counts(ours, [values])[0]), "values_per_map": values}
    return rows


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-reuse", action="store_true",
                        help="also time IPR without activation reuse on the ResNet-18 (about 50 s a call on 2 CPUs)")
    parser.add_argument("--images", type=int, default=4, help="images of the ResNet-18 timing (CPU)")
    parser.add_argument("--digits-images", type=int, default=32)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-quantus", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    resnet, x_resnet = _resnet(args.images)
    digits, x_digits = _digits(args.digits_images)
    if not args.skip_timing:
        print("\n## eMPRT vs IPR, plain gradients, CPU (median seconds per check; IPR / eMPRT: median (range) "
              "over rounds)\n")
        print("| workload | N | L | eMPRT | IPR | IPR, no reuse | IPR / eMPRT | IPR no reuse / eMPRT | load avg |")
        print("|---|---|---|---|---|---|---|---|---|")
        out["timing"] = [time_workload("resnet18_64", resnet, x_resnet, args.rounds, args.no_reuse),
                         time_workload("digits_cnn", digits, x_digits, args.rounds)]
    ok = True
    if not args.skip_quantus:
        available, why = quantus_available()
        if not available:
            print(f"\nQuantus cross-check skipped: {why}")
            out["quantus"] = {"skipped": why}
        else:
            import quantus

            print(f"\n## Cross-check with Quantus {quantus.__version__} EfficientMPRT (tolerance {TOLERANCE:g} nats)\n")
            print("| workload | N | maps | max dH_orig | max dH_rand (Quantus's state) | max d score | Quantus mean "
                  "score | our check's mean rise (90% CI) | Quantus s | our check s | equal |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            rows = [cross_check("digits_cnn", digits, x_digits), cross_check("digits_cnn", digits, x_digits, False),
                    cross_check("resnet18_64", resnet, x_resnet)]
            ok = all(row["equal"] for row in rows)
            rules = quantus_bin_rules(digits, x_digits)
            print("\nQuantus's n_bins rules on the digits maps (n = number of axes) vs ours (n = number of values):")
            for rule, row in rules.items():
                print(f"  {rule}: Quantus {row['quantus_raw']} (clipped to {row['quantus_clipped']}), ours "
                      f"{row['ours']} for {row['values_per_map']} values")
            out["quantus"] = {"version": quantus.__version__, "rows": rows, "bin_rules": rules}
    print("\n" + CONVENTIONS)
    out["seconds"] = time.perf_counter() - started
    print(f"total {out['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
