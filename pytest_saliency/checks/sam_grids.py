"""SAM's built-in sweeps (Bansal, Agarwal & Nguyen, CVPR 2020), as :class:`SweepGrid` values.

:func:`sam_grid` gives the sweep of one method by name (:data:`GRIDS`), with SAM's pixel sizes
(patch sizes, strides) scaled from SAM's 224 px inputs to the inputs' smaller side: given as
their shape, the inputs tensor, or an iterable of batches (a ``DataLoader``: the first batch's
images, which the others share). Pass a grid, or its name, as the method of
:func:`pytest_saliency.checks.sweeps.hyperparameter_sweep`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.integrity import short_usage_errors
from ..core.stream import Batches, chunks, is_stream
from ..core.validation import check_choice, check_count
from ..exceptions import SaliencyUsageError
from ..maps.baselines import SAM_INPUT_SIZE

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SweepGrid:
    """A named sweep: the method, its reference setting, the swept values and fixed options."""

    name: str
    method: str
    reference: dict[str, Any]
    sweep: dict[str, list[Any]]
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "reference": dict(self.reference),
                "sweep": {k: list(v) for k, v in self.sweep.items()}, "options": dict(self.options), "note": self.note}


def _side(input_shape: Sequence[int] | None) -> int:
    """The smaller of the last two sizes of an image's ``input_shape`` (N, C, H, W), the length of
    a series' (N, C, T) (SAM's 224 px for None)."""
    if input_shape is None:
        return SAM_INPUT_SIZE
    try:
        shape = tuple(check_count(s, "input_shape entry", minimum=0) for s in input_shape)
    except (SaliencyUsageError, TypeError):
        shape = ()
    if len(shape) < 2 or min(shape[-2:]) < 1:
        raise SaliencyUsageError(
            f"input_shape must end in (H, W), e.g. inputs.shape = (N, C, H, W); got {tuple(input_shape)!r}."
        )
    return shape[-1] if len(shape) == 3 else min(shape[-2:])


def _scaled(pixels: float, side: int) -> int:
    """SAM's pixel size on 224 px inputs, scaled to ``side`` px, at least 1."""
    return max(1, int(round(pixels * side / SAM_INPUT_SIZE)))


def _unique(values: list[int], exclude: int) -> list[int]:
    """``values`` in order, without repeats and without ``exclude`` (the reference value)."""
    out: list[int] = []
    for v in values:
        if v != exclude and v not in out:
            out.append(v)
    return out


def _grid_smoothgrad(side: int) -> SweepGrid:
    return SweepGrid(
        "smoothgrad", "smoothgrad", {"nt_samples": 50, "noise_level": 0.15},
        {"nt_samples": [100, 200, 500, 800], "noise_level": [0.05, 0.10, 0.20, 0.30]},
        {"nt_samples_batch_size": 50},
        "SAM 4.3.1: N_SG reference 50 vs {100, 200, 500, 800} at sigma = 0.15 (noise std relative to the input "
        "range). The sigma values are ours (SAM's supplement S4.1 grid is not available). nt_samples_batch_size=50 "
        "bounds memory and does not change what is averaged.",
    )


def _grid_integrated_gradients(side: int) -> SweepGrid:
    return SweepGrid(
        "integrated_gradients", "integrated_gradients", {"n_steps": 50, "baselines": "zero"},
        {"n_steps": [10, 20, 100, 200], "baselines": ["uniform", "blurred"]}, {},
        "SAM: IG's hyperparameter is N_IG on a zero baseline; the step values and the uniform / blurred baselines "
        "are ours (captum's default 50 steps is the reference).",
    )


def _grid_occlusion(side: int) -> SweepGrid:
    ref = _scaled(29, side)
    stride = _scaled(3, side)
    return SweepGrid(
        "occlusion", "occlusion", {"window": ref, "stride": stride},
        {"window": _unique([_scaled(p, side) for p in (5, 17, 41, 53)], ref),
         "stride": _unique([2 * stride, 3 * stride], stride)}, {},
        f"SAM 4.4.1 SP-L: patch 29 vs {{5, 17, 41, 53}} at stride 3 on 224 px, scaled to {side} px "
        f"(patch {ref}, stride {stride}). The stride values (2x, 3x the reference) are ours.",
    )


def _grid_occlusion_small(side: int) -> SweepGrid:
    ref = _scaled(53, side)
    return SweepGrid(
        "occlusion_small", "occlusion", {"window": ref, "stride": _scaled(3, side)},
        {"window": _unique([ref - 1, ref + 1], ref) if ref > 1 else [2]}, {},
        f"SAM 4.4.1 SP-S: patch 53 vs 52 and 54 (+-1 px) on 224 px; the reference is scaled to {side} px "
        f"({ref}), the +-1 px is not scaled.",
    )


def _grid_lime(side: int) -> SweepGrid:
    grids = [g for g in (4, 5, 10, 14) if g <= side]
    return SweepGrid(
        "lime", "lime", {"seed": 0, "n_samples": 1000, "grid": min(7, side)},
        {"seed": [1, 2, 3, 4], "n_samples": [250, 500, 2000], "grid": _unique(grids, min(7, side))}, {},
        "SAM 4.4.2 and S4.2: LIME seed, N_LIME and number of superpixels; reference = SAM's LIME defaults "
        "(seed 0, 1000 samples, 50 superpixels ~ a 7x7 grid). Swept sample counts and grids are ours. "
        "For SLIC superpixels use the 'lime_slic' grid.",
    )


def _grid_lime_slic(side: int) -> SweepGrid:
    return SweepGrid(
        "lime_slic", "lime", {"seed": 0, "n_samples": 1000, "n_segments": 50},
        {"seed": [1, 2, 3, 4], "n_segments": [25, 100, 150]}, {},
        "SAM's LIME: 50 SLIC superpixels (compactness 30, sigma 3 px on 224 px), 1000 samples, seed 0; "
        "swept superpixel counts are ours.",
    )


def _grid_kernel_shap(side: int) -> SweepGrid:
    return SweepGrid(
        "kernel_shap", "kernel_shap", {"seed": 0, "n_samples": 200},
        {"seed": [1, 2, 3, 4], "n_samples": [50, 100, 500, 1000]}, {},
        "Not in SAM; the same design as LIME: seed and sample count around the package default (200).",
    )


def _blur(pixels: float, side: int) -> float:
    """SAM's blur radius on 224 px inputs, scaled to ``side`` px (a float: a Gaussian's sigma need not be whole)."""
    return round(pixels * side / SAM_INPUT_SIZE, 4)


def _grid_meaningful_perturbation(side: int) -> SweepGrid:
    ref = _blur(10, side)
    return SweepGrid(
        "meaningful_perturbation", "meaningful_perturbation", {"n_iter": 300, "blur_radius": ref, "seed": 0},
        {"n_iter": [10, 150, 450], "blur_radius": [_blur(5, side), _blur(30, side)], "seed": [1, 2, 3, 4]},
        {"init": "random"},
        f"SAM 4.3.2: N_iter reference 300 vs {{10, 150, 450}}, b_R reference 10 vs {{5, 30}} px on 224 px (scaled to "
        f"{side} px: {ref:g} vs {_blur(5, side):g}, {_blur(30, side):g}), and the random start's seed (SAM S4.3; "
        "seeds 1-4 are ours); a random start (SAM's 'random' init) for all three so that the seed matters. "
        "Compare MP's maps as SAM did with preset=pytest_saliency.maps.meaningful_perturbation.MP_PIPELINE "
        "(1 - m as it is, SSIM data_range 1). For the original's circular start use 'meaningful_perturbation_circular'.",
    )


def _grid_meaningful_perturbation_circular(side: int) -> SweepGrid:
    ref = _blur(10, side)
    return SweepGrid(
        "meaningful_perturbation_circular", "meaningful_perturbation", {"n_iter": 300, "blur_radius": ref},
        {"n_iter": [10, 150, 450], "blur_radius": [_blur(5, side), _blur(30, side)]}, {"init": "circular"},
        f"SAM 4.3.2's N_iter and b_R experiments exactly as run (the original's circular start, which draws "
        f"nothing): N_iter 300 vs {{10, 150, 450}}, b_R 10 vs {{5, 30}} px on 224 px, scaled to {side} px.",
    )


_GRID_BUILDERS: dict[str, Callable[[int], SweepGrid]] = {
    "smoothgrad": _grid_smoothgrad,
    "integrated_gradients": _grid_integrated_gradients,
    "occlusion": _grid_occlusion,
    "occlusion_small": _grid_occlusion_small,
    "lime": _grid_lime,
    "lime_slic": _grid_lime_slic,
    "kernel_shap": _grid_kernel_shap,
    "meaningful_perturbation": _grid_meaningful_perturbation,
    "meaningful_perturbation_circular": _grid_meaningful_perturbation_circular,
}
#: The names :func:`sam_grid` knows.
GRIDS: tuple[str, ...] = tuple(_GRID_BUILDERS)


def _first_batch_shape(stream: Any) -> tuple[int, ...]:
    """The shape of the inputs of an iterable of batches' first batch (a one-shot iterator is
    refused: the check it is then passed to would miss that batch)."""
    loader = stream.loader if isinstance(stream, Batches) else stream
    if isinstance(loader, Iterator):
        raise SaliencyUsageError(
            f"sam_grid reads the first batch of the inputs for their size, but a {type(loader).__name__} can be read "
            "only once: the check would then miss that batch. Pass the first batch's shape (input_shape="
            "batch.shape), or a DataLoader or a list of batches, which can be read again."
        )
    first = next(chunks(stream, "cpu"), None)
    if first is None:
        raise SaliencyUsageError("the inputs yielded no batch, so sam_grid has no size to scale to.")
    return tuple(first.inputs.shape)


def _is_batch(item: Any) -> bool:
    """Whether a sequence's item is a batch (a tensor or array of inputs, a tuple or a dict), not a size."""
    return getattr(item, "ndim", 0) > 0 or (isinstance(item, (Sequence, Mapping)) and not isinstance(item, (str, bytes)))


def _shape(input_shape: Any) -> Sequence[int] | None:
    """``input_shape`` as a shape: a tensor's (or array's) own, the first batch's of an iterable
    of batches, or the shape given (which :func:`_side` checks)."""
    if getattr(input_shape, "ndim", 0) > 0:
        return tuple(input_shape.shape)
    sizes = isinstance(input_shape, Sequence) and not (input_shape and _is_batch(input_shape[0]))
    if input_shape is not None and not sizes and is_stream(input_shape):
        return _first_batch_shape(input_shape)
    return input_shape


@short_usage_errors
def sam_grid(name: str, input_shape: Sequence[int] | torch.Tensor | Iterable[Any] | None = None) -> SweepGrid:
    """SAM's sweep ``name`` (one of :data:`GRIDS`), with pixel sizes scaled to ``input_shape``.

    ``input_shape`` is ``inputs.shape`` (only the last two sizes are used), the inputs tensor, or
    an iterable of batches such as a ``DataLoader`` (the first batch's inputs; a generator, which
    can be read only once, is refused); ``None`` keeps SAM's 224 px values. Pass the grid as the
    method: ``hyperparameter_sweep(model, x, sam_grid("occlusion", x.shape))``.
    """
    check_choice(name, "grid", GRIDS)
    return _GRID_BUILDERS[name](_side(_shape(input_shape)))


__all__ = ["GRIDS", "SweepGrid", "sam_grid"]
