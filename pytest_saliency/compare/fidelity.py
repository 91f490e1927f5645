"""Infidelity and sensitivity of explanations (Yeh et al. 2019), batched and seeded, over captum.metrics.

Watson et al. plot each model's explanation consistency against the infidelity and the
sensitivity of its explanations. Both numbers come from :mod:`captum.metrics`; this module only
feeds captum perturbations drawn from local generators and splits the work into batches:

* **Infidelity** (:func:`infidelity_values`): ``E_I[(I . Phi(x) - (f(x) - f(x - I)))^2]`` over
  ``n_perturb_samples`` perturbations ``I ~ N(0, radius^2)`` per input (Yeh et al.'s Gaussian
  perturbation), ``Phi`` the attribution of the explained class ``f``. ``normalize=True`` (the
  default, as Yeh et al.'s code) first rescales ``Phi`` by the least-squares factor, so that the
  number measures the shape of the explanation, not its units (captum's ``normalize``).
  Lower is more faithful.
* **Sensitivity** (:func:`sensitivity_values`): captum's ``sensitivity_max``, the largest
  ``||Phi(x + d) - Phi(x)|| / ||Phi(x)||`` over ``n_perturb_samples`` perturbations ``d`` drawn
  uniformly from the L-infinity ball of ``radius`` (captum's default perturbation). Lower is
  more stable.

Seeds: the perturbations of the input at ``first_example + i`` are drawn from a local generator
seeded with :func:`~pytest_saliency.core.rng.derive_seed` of ``(seed, metric, first_example + i)``
(``first_example`` defaults to :func:`~pytest_saliency.core.stream.example_offset`), all
``n_perturb_samples`` at once, on the CPU. An input's perturbations therefore do not depend on
the batching (``max_rows``, the batches of a loader), on the other inputs or on the device (its
value may move in float32's last digits with the batch size the model runs: about 1e-4 relative
measured), two models are measured on the same perturbations, and no global RNG state is touched. Callers pass
``forward(x, rows)`` and ``explain(x, rows)``, ``rows`` giving for each row of ``x`` the index
of its input in ``inputs`` (a perturbed copy has its input's row), so that targets and
per-input forward arguments follow the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..core.rng import derive_seed, torch_seed_of
from ..core.stream import example_offset
from ..core.torchtools import require_torch
from ..core.validation import check_count, check_flag, check_number, check_seed
from ..exceptions import SaliencyUsageError

if TYPE_CHECKING:
    import torch

#: ``forward(x, rows)``: the explained class's score of each row of ``x`` (shape (len(x),)).
Forward = Callable[["torch.Tensor", list[int]], "torch.Tensor"]
#: ``explain(x, rows)``: the attributions of each row of ``x``, shaped like them.
Explain = Callable[["torch.Tensor", list[int]], "torch.Tensor"]

#: Defaults: captum's ``sensitivity_max`` radius and sample count.
DEFAULT_RADIUS = 0.02
DEFAULT_SAMPLES = 10
METRICS = ("infidelity", "sensitivity")


def check_fidelity_options(n_perturb_samples: Any, radius: Any) -> tuple[int, float]:
    """``(n_perturb_samples, radius)`` checked."""
    n = check_count(n_perturb_samples, "n_perturb_samples", minimum=1,
                    hint="It is the number of perturbations per input, e.g. 10 (captum's default).")
    r = check_number(radius, "perturb_radius", low=0.0, low_open=True,
                     hint="It is the perturbations' size in input units (Gaussian std for infidelity, L-inf "
                          "radius for sensitivity), e.g. 0.02 for images in [0, 1].")
    return n, r


def perturbation_noise(inputs: torch.Tensor, n_perturb_samples: int, radius: float, seed: int, metric: str,
                       first_example: int | None = None) -> torch.Tensor:
    """The perturbations of ``metric`` (``"infidelity"``: N(0, radius^2); ``"sensitivity"``:
    U(-radius, radius)) for each input, shape ``(N, n_perturb_samples, *inputs.shape[1:])`` on
    ``inputs``' device: input ``i``'s drawn on the CPU from its own generator (module docstring)."""
    torch = require_torch()
    if metric not in METRICS:
        raise SaliencyUsageError(f"metric must be one of {METRICS}, got {metric!r}.")
    first = example_offset() if first_example is None else int(first_example)
    shape = (n_perturb_samples, *inputs.shape[1:])
    dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
    generator = torch.Generator()
    rows = []
    for i in range(int(inputs.shape[0])):
        generator.manual_seed(torch_seed_of(derive_seed(seed, "fidelity", metric, first + i)))
        if metric == "infidelity":
            rows.append(torch.randn(shape, generator=generator, dtype=torch.float64) * radius)
        else:
            rows.append((torch.rand(shape, generator=generator, dtype=torch.float64) * 2.0 - 1.0) * radius)
    noise = torch.stack(rows) if rows else torch.zeros((0, *shape), dtype=torch.float64)
    return noise.to(device=inputs.device, dtype=dtype)


class _Samples:
    """Hands out each input's perturbations in the order captum asks for them: ``take(x)`` for a
    batch ``x`` of ``m`` copies of each input (``repeat_interleave``) gives the next ``m`` of each."""

    def __init__(self, noise: torch.Tensor) -> None:
        self.noise, self.done = noise, 0

    def take(self, x: torch.Tensor) -> torch.Tensor:
        n = int(self.noise.shape[0])
        m = int(x.shape[0]) // max(n, 1)
        part = self.noise[:, self.done:self.done + m]
        self.done += m
        return part.reshape(x.shape)


def _chunks(n: int, n_perturb_samples: int, max_rows: int | None) -> tuple[list[tuple[int, int]], int | None]:
    """The input ranges of captum's calls and its ``max_examples_per_batch``: at most ``max_rows``
    perturbed rows per model call (one input at a time, its samples split, when they are more)."""
    if max_rows is None:
        return [(0, n)], None
    per_call = max(1, max_rows // n_perturb_samples)
    limit = None if per_call * n_perturb_samples <= max_rows else max_rows
    return [(s, min(s + per_call, n)) for s in range(0, n, per_call)], limit


def _single(x: Any) -> Any:
    return x[0] if isinstance(x, tuple) else x


def _options(n_perturb_samples: Any, radius: Any, seed: Any, max_rows: Any) -> tuple[int, float, int, int | None]:
    n, r = check_fidelity_options(n_perturb_samples, radius)
    rows = check_count(max_rows, "max_rows", minimum=1, allow_none=True,
                       hint="It bounds the perturbed inputs per model call; None runs them all at once.")
    return n, r, check_seed(seed), rows


def infidelity_values(
    forward: Forward, inputs: torch.Tensor, attributions: torch.Tensor, *,
    n_perturb_samples: int = DEFAULT_SAMPLES, radius: float = DEFAULT_RADIUS, normalize: bool = True,
    seed: int = 0, first_example: int | None = None, max_rows: int | None = None,
) -> torch.Tensor:
    """captum's ``infidelity`` of ``attributions`` of each input, float64 on the CPU, shape (N,)
    (module docstring). ``forward(x, rows)`` returns the explained class's score per row."""
    from captum.metrics import infidelity

    torch = require_torch()
    n, r, seed, max_rows = _options(n_perturb_samples, radius, seed, max_rows)
    check_flag(normalize, "normalize")
    noise = perturbation_noise(inputs, n, r, seed, "infidelity", first_example)
    spans, limit = _chunks(int(inputs.shape[0]), n, max_rows)
    out = []
    for start, stop in spans:
        samples = _Samples(noise[start:stop])
        ids = list(range(start, stop))

        def perturb(x: Any, samples: _Samples = samples) -> tuple[Any, Any]:
            noise_part = samples.take(x)
            return noise_part, x - noise_part

        def scores(x: Any, ids: list[int] = ids) -> Any:
            return forward(x, _rows_of(ids, int(x.shape[0])))

        with torch.no_grad():
            values = infidelity(scores, perturb, inputs[start:stop], attributions[start:stop],
                                n_perturb_samples=n, max_examples_per_batch=limit, normalize=normalize)
        out.append(values.detach().double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def sensitivity_values(
    explain: Explain, inputs: torch.Tensor, *, attributions: torch.Tensor | None = None,
    n_perturb_samples: int = DEFAULT_SAMPLES, radius: float = DEFAULT_RADIUS, seed: int = 0,
    first_example: int | None = None, max_rows: int | None = None,
) -> torch.Tensor:
    """captum's ``sensitivity_max`` of ``explain`` at each input, float64 on the CPU, shape (N,)
    (module docstring). ``attributions``, when given, are ``explain``'s of ``inputs`` themselves
    (captum would explain them once more)."""
    from captum.metrics import sensitivity_max

    torch = require_torch()
    n, r, seed, max_rows = _options(n_perturb_samples, radius, seed, max_rows)
    noise = perturbation_noise(inputs, n, r, seed, "sensitivity", first_example)
    spans, limit = _chunks(int(inputs.shape[0]), n, max_rows)
    out = []
    for start, stop in spans:
        samples = _Samples(noise[start:stop])
        ids = list(range(start, stop))
        chunk = inputs[start:stop]
        known = None if attributions is None else attributions[start:stop]

        def perturb(x: Any, radius: float, samples: _Samples = samples) -> Any:
            x = _single(x)
            return x + samples.take(x)

        def explained(given: Any, ids: list[int] = ids, chunk: Any = chunk, known: Any = known) -> Any:
            x = _single(given)
            if known is not None and x is chunk:  # captum's call on the unperturbed inputs
                result = known
            else:
                result = explain(x, _rows_of(ids, int(x.shape[0])))
            return (result,) if isinstance(given, tuple) else result  # as captum's methods: the inputs' format

        values = sensitivity_max(explained, chunk, perturb_func=perturb, perturb_radius=r, n_perturb_samples=n,
                                 max_examples_per_batch=limit)
        out.append(values.detach().double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _rows_of(ids: Sequence[int], count: int) -> list[int]:
    """The input of each of ``count`` rows: ``ids`` each repeated ``count / len(ids)`` times in turn
    (captum's ``repeat_interleave``)."""
    m = count // len(ids)
    if m * len(ids) != count:
        raise RuntimeError(f"pytest-saliency bug: {count} perturbed rows for {len(ids)} inputs")
    return [i for i in ids for _ in range(m)]


__all__ = [
    "DEFAULT_RADIUS",
    "DEFAULT_SAMPLES",
    "METRICS",
    "Explain",
    "Forward",
    "check_fidelity_options",
    "infidelity_values",
    "perturbation_noise",
    "sensitivity_values",
]
