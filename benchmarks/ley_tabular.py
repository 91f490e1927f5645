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

This script repeats the vanilla and perturbed arms on ``examples/tabular_repo`` (nothing is
downloaded):

* data: breast cancer, 30 standardized features, fixed seeded 80/20 split; all 114 test inputs
  are explained, for class 1 (benign), as the paper explains the positive class;
* models: the paper's 128-64-16 ReLU network, ``tabular_model.train(seed)`` for 16 seeds
  (``--seed-offset`` .. +15), Adam, 30 epochs, fixed data order (only the init seed differs);
* vanilla: ``consistency_vs_ensemble_size`` over sizes 1, 2, 4, 8 (disjoint ensembles averaging
  probabilities; size s has 16 / s ensembles and all pairs between them);
* perturbed: each trained model becomes ``perturbed_ensemble(model, layer="fc1",
  parameter="bias", sigma=0.3, n=20)`` (the example test's setting), then the same sizes;
* methods: ``saliency`` (input gradients, the example test's method and the paper's Figs. 4-6)
  and ``smoothgrad`` with the paper's settings (50 samples, noise std 0.1 on standardized
  features, Table 1's method).

Per method it prints a Markdown table: top-5 SA (mean over ensemble pairs and inputs, from
``consistency_vs_ensemble_size``), its std over the inputs (each input's SA averaged over the
ensemble pairs, as the paper's "mean ± std" over individuals), and the mean test accuracy of the
ensembles of each size, vanilla and perturbed, with the paper's single-model values for reference. Runs on the CPU with one thread (the networks are tiny).
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

from pytest_saliency import (
    consistency_vs_ensemble_size,
    ensemble,
    explain,
    perturbed_ensemble,
)
from pytest_saliency.compare.metrics import sign_agreement

SIZES = (1, 2, 4, 8)
TOP_K = 5
METHODS: dict[str, dict[str, Any]] = {
    "saliency": {},
    "smoothgrad": {"nt_samples": 50, "stdevs": 0.1},  # Ley et al.: 50 samples, std 0.1
}
#: Ley et al.'s Table 1, SmoothGrad top-5 SA between single models (mean +- std over individuals).
PAPER_SINGLE = {"HELOC (23 features)": "0.65 ± 0.09", "German Credit (70)": "0.50 ± 0.08",
                "Adult Income (6)": "0.83 ± 0.07"}


def per_input_sa(models: list[torch.nn.Module], size: int, x: torch.Tensor, method: str) -> torch.Tensor:
    """Top-5 SA of each input, averaged over all pairs of the disjoint ensembles of ``size``: the
    per-individual values whose mean and std Ley et al.'s Table 1 reports."""
    groups = [models[j * size:(j + 1) * size] for j in range(len(models) // size)]
    maps = [explain(ensemble(group), x, method, target=tabular_model.POSITIVE_CLASS, **METHODS[method])
            for group in groups]
    pairs = [sign_agreement(maps[i], maps[j], TOP_K, warn_unsigned=False)
             for i, j in itertools.combinations(range(len(maps)), 2)]
    return torch.stack(pairs).mean(dim=0)


def curve(members: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor, method: str) -> dict[str, Any]:
    result = consistency_vs_ensemble_size(
        members, x, sizes=SIZES, method=method, target=tabular_model.POSITIVE_CLASS,
        metrics=("sign_agreement", "signed_set_agreement"), k=TOP_K, n_splits=2, **METHODS[method],
    )
    models = list(members.values())
    per_input = [per_input_sa(models, size, x, method) for size in SIZES]
    return {
        "sa": result.series("sign_agreement"),
        "sa_std_over_inputs": [float(values.std()) for values in per_input],
        "sa_recomputed": [float(values.mean()) for values in per_input],  # a cross-check of "sa"
        "ssa": result.series("signed_set_agreement"),
        "accuracy": [tabular_model.ensemble_accuracy(models, size, x, y) for size in SIZES],
        "seconds": result.seconds,
    }


def table(method: str, rows: dict[str, dict[str, Any]]) -> str:
    head = " | ".join(f"size {s}" for s in SIZES)
    lines = [f"| {method}: top-5 SA ± std over inputs (test accuracy) | {head} |", "|---|" + "---|" * len(SIZES)]
    for arm, row in rows.items():
        cells = " | ".join(f"{sa:.3f} ± {sd:.2f} ({acc:.3f})"
                           for sa, sd, acc in zip(row["sa"], row["sa_std_over_inputs"], row["accuracy"]))
        lines.append(f"| {arm} | {cells} |")
    for arm, row in rows.items():
        cells = " | ".join(f"{v:.3f}" for v in row["ssa"])
        lines.append(f"| {arm}, top-5 SSA | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seed-offset", type=int, default=0, help="train seeds offset .. offset+15")
    parser.add_argument("--sigma", type=float, default=0.3, help="first-layer bias noise std")
    parser.add_argument("--perturbations", type=int, default=20, help="noisy copies per trained model")
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
    perturbed = {
        f"{label}~perturbed": perturbed_ensemble(model, layer="fc1", parameter="bias", sigma=args.sigma,
                                                 n=args.perturbations, seed=seed)
        for seed, (label, model) in zip(seeds, trained.items())
    }
    print(f"seeds {seeds[0]}..{seeds[-1]}, trained in {train_seconds:.1f} s; single-model test accuracy "
          f"{min(accuracies):.3f}-{max(accuracies):.3f} (mean {sum(accuracies) / len(accuracies):.3f}); "
          f"{len(x)} test inputs, {x.shape[1]} features, target class {tabular_model.POSITIVE_CLASS}")
    print(f"perturbed: fc1 bias, sigma {args.sigma}, {args.perturbations} copies per trained model\n")
    out: dict[str, Any] = {"seeds": seeds, "n_inputs": len(x), "sigma": args.sigma,
                           "perturbations": args.perturbations, "single_accuracies": accuracies,
                           "torch": torch.__version__, "python": platform.python_version(), "methods": {}}
    for method in args.methods:
        rows = {"vanilla": curve(trained, x, y, method), "perturbed": curve(perturbed, x, y, method)}
        out["methods"][method] = rows
        print(table(method, rows))
        for arm, row in rows.items():  # the package's means and the per-input recomputation must agree
            gap = max(abs(a - b) for a, b in zip(row["sa"], row["sa_recomputed"]))
            if gap > 1e-3:
                print(f"WARNING: {method} {arm}: per-input recomputation differs from the check by {gap:.4f}")
        print(f"({rows['vanilla']['seconds']:.1f} s vanilla, {rows['perturbed']['seconds']:.1f} s perturbed)\n")
    print("Ley et al., Table 1, SmoothGrad top-5 SA between single models: "
          + "; ".join(f"{k} {v}" for k, v in PAPER_SINGLE.items()))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
