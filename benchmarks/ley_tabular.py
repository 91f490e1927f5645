"""Ley et al.'s ensemble finding on a bundled tabular data set (scikit-learn's breast cancer).

    python benchmarks/ley_tabular.py                                # the table in RESULTS.md
    python benchmarks/ley_tabular.py --methods saliency --seed-offset 16   # another 16 seeds
    python benchmarks/ley_tabular.py --json ley_tabular.json

Ley et al. ("Consistent Explanations in the Face of Model Indeterminacy via Ensembling") train
networks that differ only in their initialization seed and measure how far the top-5 features of
their explanations agree (top-5 sign agreement, SA). Table 1 of the paper gives SmoothGrad's
top-5 SA between *single* models as 0.65 (HELOC, 23 features), 0.50 (German Credit, 70) and 0.83
(Adult Income, 6), and shows it rising for ensembles of four pre-trained models, more so for
"perturbed" ensembles (each trained model replaced by copies with Gaussian noise on the first
layer).

This script repeats the paper's four strategies on ``examples/tabular_repo`` (nothing is
downloaded):

* data: breast cancer, 30 standardized features, fixed seeded 80/20 split; all 114 test inputs
  are explained, for class 1 (benign), as the paper explains the positive class;
* models: the paper's 128-64-16 ReLU network, ``tabular_model.train(seed)`` for 16 seeds
  (``--seed-offset`` .. +15), Adam, 30 epochs, fixed data order (only the init seed differs);
* vanilla: ``consistency_vs_ensemble_size`` over sizes 1, 2, 4, 8 (disjoint ensembles averaging
  probabilities; size s has 16 / s ensembles and all pairs between them); a size is always the
  number of *pre-trained models* in an ensemble;
* perturb (``strategy="perturb"``): each trained model becomes 20 copies with noise on the first
  layer's biases, ``sigma=0.3`` (the example test's setting), then the same sizes;
* connect (``strategy="connect"``): consecutive models are paired (0-1, 2-3, ...), a quadratic
  Bezier curve is trained between each pair on the training split (Adam, lr 1e-3, batches of 32
  in a fixed order, 30 epochs: the models' own recipe) and 40 models at uniform points of each
  curve replace the pair; sizes 2, 4, 8 (a curve needs two models);
* combine (``strategy="combine"``): 10 models per curve, each perturbed 4 times as in perturb.
  Every strategy thus holds 20 members per pre-trained model (vanilla: 1);
* methods: ``saliency`` (input gradients, the example test's method and the paper's Figs. 4-6)
  and ``smoothgrad`` with the paper's settings (50 samples, noise std 0.1 on standardized
  features, Table 1's method).

Per method it prints a Markdown table: top-5 SA (mean over ensemble pairs and inputs, from
``consistency_vs_ensemble_size``), its std over the inputs (each input's SA averaged over the
ensemble pairs, as the paper's "mean ± std" over individuals), and the mean and the lowest test
accuracy of the ensembles of each size (every ensemble's accuracy is in the JSON); then top-5
SSA (from the check) and top-d CDC (all 30 features, as the paper's Table 1, recomputed here from
the same ensembles, which ``strategy_ensembles`` rebuilds identically from the seeds), with the
paper's values for reference. Runs on the CPU with one thread (the networks are tiny).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "examples" / "tabular_repo"))

import tabular_model

from pytest_saliency import consistency_vs_ensemble_size, explain
from pytest_saliency.checks.ensembles import strategy_ensembles
from pytest_saliency.compare.metrics import consistent_direction, sign_agreement

SIZES = (1, 2, 4, 8)
STRATEGY_SIZES = {"vanilla": SIZES, "perturb": SIZES, "connect": (2, 4, 8), "combine": (2, 4, 8)}
TOP_K = 5
METHODS: dict[str, dict[str, Any]] = {
    "saliency": {},
    "smoothgrad": {"nt_samples": 50, "stdevs": 0.1},  # Ley et al.: 50 samples, std 0.1
}
#: Ley et al.'s Table 1, SmoothGrad top-5 SA between single models (mean +- std over individuals).
PAPER_SINGLE = {"HELOC (23 features)": "0.65 ± 0.09", "German Credit (70)": "0.50 ± 0.08",
                "Adult Income (6)": "0.83 ± 0.07"}
#: Ley et al.'s Table 1, SmoothGrad top-5 SA of ensembles of four pre-trained models:
#: vanilla / perturb / connect / combine.
PAPER_FOUR = {"HELOC": "0.81 / 0.87 / 0.86 / 0.90", "German Credit": "0.69 / 0.73 / 0.71 / 0.76",
              "Adult Income": "0.89 / 0.90 / 0.90 / 0.92", "Default Credit": "0.67 / 0.72 / 0.70 / 0.75",
              "GMSC": "0.95 / 0.95 / 0.96 / 0.97"}


def per_input(ensembles: list[torch.nn.Module], x: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    """Top-5 SA and top-d CDC of each input, averaged over all pairs of the ensembles: the
    per-individual values whose mean and std Ley et al.'s Table 1 reports."""
    maps = [explain(e, x, method, target=tabular_model.POSITIVE_CLASS, **METHODS[method]) for e in ensembles]
    pairs = list(itertools.combinations(range(len(maps)), 2))
    sa = [sign_agreement(maps[i], maps[j], TOP_K, warn_unsigned=False) for i, j in pairs]
    cdc = [consistent_direction(maps[i], maps[j], None, warn_unsigned=False) for i, j in pairs]
    return {"sa": torch.stack(sa).mean(dim=0), "cdc": torch.stack(cdc).mean(dim=0)}


def arm(trained: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor, method: str, strategy: str,
        options: dict[str, Any]) -> dict[str, Any]:
    sizes = STRATEGY_SIZES[strategy]
    result = consistency_vs_ensemble_size(
        trained, x, sizes=sizes, method=method, target=tabular_model.POSITIVE_CLASS,
        metrics=("sign_agreement", "signed_set_agreement"), k=TOP_K, n_splits=2,
        strategy=strategy, strategy_options=options or None, **METHODS[method],
    )
    built = strategy_ensembles(trained, sizes, strategy, options or None)
    values = [per_input(list(built[size].values()), x, method) for size in sizes]
    accuracies = [[tabular_model.accuracy(e, x, y) for e in built[size].values()] for size in sizes]
    return {
        "sizes": list(sizes),
        "sa": result.series("sign_agreement"),
        "sa_std_over_inputs": [float(v["sa"].std()) for v in values],
        "sa_recomputed": [float(v["sa"].mean()) for v in values],  # a cross-check of "sa"
        "ssa": result.series("signed_set_agreement"),
        "cdc_top_d": [float(v["cdc"].mean()) for v in values],
        "cdc_top_d_std_over_inputs": [float(v["cdc"].std()) for v in values],
        "accuracy": [sum(a) / len(a) for a in accuracies],
        "accuracy_min": [min(a) for a in accuracies],
        "accuracies": accuracies,
        "members_per_ensemble": [len(next(iter(built[size].values())).members) for size in sizes],
        "seconds": result.seconds,
    }


def table(method: str, rows: dict[str, dict[str, Any]]) -> str:
    head = " | ".join(f"size {s}" for s in SIZES)
    lines = [f"| {method}: top-5 SA ± std over inputs (test accuracy: mean, lowest ensemble) | {head} |",
             "|---|" + "---|" * len(SIZES)]

    def cells(row: dict[str, Any], cell: Any) -> str:
        by_size = {size: index for index, size in enumerate(row["sizes"])}
        return " | ".join(cell(by_size[size]) if size in by_size else "—" for size in SIZES)

    for arm_name, row in rows.items():
        lines.append(f"| {arm_name} | " + cells(row, lambda i, r=row: (
            f"{r['sa'][i]:.3f} ± {r['sa_std_over_inputs'][i]:.2f} ({r['accuracy'][i]:.3f}, {r['accuracy_min'][i]:.3f})"
        )) + " |")
    for arm_name, row in rows.items():
        lines.append(f"| {arm_name}, top-5 SSA | " + cells(row, lambda i, r=row: f"{r['ssa'][i]:.3f}") + " |")
    for arm_name, row in rows.items():
        lines.append(f"| {arm_name}, top-d CDC | " + cells(row, lambda i, r=row: f"{r['cdc_top_d'][i]:.3f}") + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seed-offset", type=int, default=0, help="train seeds offset .. offset+15")
    parser.add_argument("--sigma", type=float, default=0.3, help="first-layer bias noise std")
    parser.add_argument("--perturbations", type=int, default=20, help="noisy copies per trained model")
    parser.add_argument("--curve-points", type=int, default=40, help="connect: models per curve")
    parser.add_argument("--curve-epochs", type=int, default=30, help="epochs of the curve's control point")
    parser.add_argument("--curve-lr", type=float, default=tabular_model.LR,
                        help="Adam's lr for the control point (0: the untrained straight line, a control)")
    parser.add_argument("--combine-points", type=int, default=10, help="combine: models per curve")
    parser.add_argument("--combine-perturbations", type=int, default=4, help="combine: noisy copies per curve model")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_SIZES), choices=list(STRATEGY_SIZES))
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="pytest_saliency")

    x, y = tabular_model.load_tabular("test")
    seeds = list(range(args.seed_offset, args.seed_offset + 16))
    start = time.perf_counter()
    trained = {f"seed={s}": tabular_model.train(s) for s in seeds}
    train_seconds = time.perf_counter() - start
    accuracies = [tabular_model.accuracy(m, x, y) for m in trained.values()]
    x_train, y_train = tabular_model.load_tabular("train")
    loader = list(zip(x_train.split(tabular_model.BATCH), y_train.split(tabular_model.BATCH)))
    noise = {"layer": "fc1", "parameter": "bias", "sigma": args.sigma}
    curve = {"train": loader, "epochs": args.curve_epochs, "lr": args.curve_lr}
    options = {
        "vanilla": {},
        "perturb": {**noise, "perturbations": args.perturbations},
        "connect": {**curve, "n": args.curve_points},
        "combine": {**curve, **noise, "n": args.combine_points, "perturbations": args.combine_perturbations},
    }
    print(f"seeds {seeds[0]}..{seeds[-1]}, trained in {train_seconds:.1f} s; single-model test accuracy "
          f"{min(accuracies):.3f}-{max(accuracies):.3f} (mean {sum(accuracies) / len(accuracies):.3f}); "
          f"{len(x)} test inputs, {x.shape[1]} features, target class {tabular_model.POSITIVE_CLASS}")
    print(f"perturb: fc1 bias, sigma {args.sigma}, {args.perturbations} copies per trained model; connect: "
          f"{args.curve_points} models per curve ({args.curve_epochs} epochs, lr {args.curve_lr:g}); combine: {args.combine_points} "
          f"models per curve x {args.combine_perturbations} perturbations\n")
    out: dict[str, Any] = {"seeds": seeds, "n_inputs": len(x), "sigma": args.sigma,
                           "perturbations": args.perturbations, "single_accuracies": accuracies,
                           "options": {k: {o: v for o, v in opts.items() if o != "train"} for k, opts in options.items()},
                           "torch": torch.__version__, "python": platform.python_version(), "methods": {}}
    for method in args.methods:
        rows = {strategy: arm(trained, x, y, method, strategy, options[strategy]) for strategy in args.strategies}
        out["methods"][method] = rows
        print(table(method, rows))
        for name, row in rows.items():  # the package's means and the per-input recomputation must agree
            gap = max(abs(a - b) for a, b in zip(row["sa"], row["sa_recomputed"]))
            if gap > 1e-3:
                print(f"WARNING: {method} {name}: per-input recomputation differs from the check by {gap:.4f}")
        print("(" + ", ".join(f"{row['seconds']:.1f} s {name}" for name, row in rows.items()) + ")\n")
    print("Ley et al., Table 1, SmoothGrad top-5 SA between single models: "
          + "; ".join(f"{k} {v}" for k, v in PAPER_SINGLE.items()))
    print("Ley et al., Table 1, SmoothGrad top-5 SA of ensembles of four pre-trained models, vanilla / perturb / "
          "connect / combine: " + "; ".join(f"{k} {v}" for k, v in PAPER_FOUR.items()))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
