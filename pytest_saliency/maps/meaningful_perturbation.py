"""Meaningful Perturbation (Fong & Vedaldi 2017) as SAM's code runs it: the method
``explain(..., "meaningful_perturbation")``, batched over images.

**What is optimized.** A mask ``m`` in [0, 1] on a coarse ``mask_size x mask_size`` grid,
upsampled to the image by nearest neighbour (SAM's ``UpsamplingNearest2d``), blends each image
``x`` with its Gaussian-blurred copy ``b`` (sigma ``blur_radius`` px, SAM's b_R):
``x' = m * x + (1 - m) * b``. Per image the loss is SAM's (``MP_MADRY.py``)::

    l1_coeff * sum |1 - m|  +  tv_coeff * sum_(neighbours) |m_i - m_j| ** tv_beta  +  p(target | x')

(sums over the coarse grid's cells; ``p`` is the softmax of the selected scores), minimized by
``n_iter`` Adam steps (learning rate ``learning_rate``), each followed by clamping ``m`` to
[0, 1]. On an accelerator the images of a chunk are optimized together: the loss is the sum of the
images' losses, so each mask gets its own image's gradient, and Adam updates every value on its
own. On the CPU they run one at a time, so that a map does not depend on its batch bit for bit.

**The map** is the deletion mask's importance ``1 - m`` upsampled to (N, 1, H, W), in [0, 1]
(SAM saves ``1 - m``): 1 where the optimizer blurred the image away to lower the target's
probability. Compare such maps with :data:`MP_PIPELINE` (SAM's SSIM ``data_range=1`` for MP masks,
no rescaling).

**Initialization** (``init``): ``"random"`` (default), uniform [0, 1) per cell, drawn from a
generator seeded with :func:`~pytest_saliency.maps.methods.image_seed` of the image (SAM 4.3.2:
"in practice, MP users randomly initialize"); ``"circular"``, the original's: of blurred discs of
growing radius deleted at the grid's centre, the smallest that takes the target's probability
within 1% of the fully blurred image's (SAM's ``test_circular_masks``, threshold 0.01), then
``1 - disc``. SAM ran this on a 28-cell grid with radii 0, 5, ..., 170 cells and a disc blur of
10 cells; here both scale with ``mask_size / 28``. The circular start draws nothing, so the maps
do not depend on the seed.

**Defaults** are SAM's code: 300 steps, b_R = 10 px and a 28-cell grid on 224 px images (the
sensitivity runs' ``--mask_init_size 28``), both scaled to the inputs' smaller side (``None``),
the grid to no fewer than :data:`MIN_MASK_SIZE` cells (or the side's pixels, if fewer): scaled
down to 32 px digits SAM's grid has 4 cells per side, and a mask that coarse gives maps no better
than random ones (deletion AUC 0.37 against 0.33 for random maps; 0.14 with 8 cells);
tv_beta 3, tv_coeff 1e-2, l1_coeff 1e-4, learning rate 0.1. Left out: SAM's 4 px jitter (it crops
a 228 px resize at a random offset each step; inputs here come at the model's size) and its
final 1 px PIL blur of the saved mask. The blur is :func:`~pytest_saliency.maps.baselines.gaussian_blur`
of the model's inputs (replicated edges, truncated at 3 sigma), not PIL's on 8-bit pixels.

Images (N, C, H, W) only: other modalities are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..core.forward import captum_forward, current_call
from ..core.torchtools import require_torch
from ..core.validation import is_count, is_real
from ..exceptions import SaliencyUsageError
from .baselines import SAM_INPUT_SIZE, gaussian_blur
from .methods import METHODS, image_seed
from .postprocess import PRESETS

if TYPE_CHECKING:
    import torch

NAME = "meaningful_perturbation"
INITS = ("random", "circular")
#: SAM's MP runs: a 28 x 28 mask on 224 px images, blur radius 10 px.
SAM_MASK_SIZE = 28
#: The fewest cells per side of the default grid (see the module docstring).
MIN_MASK_SIZE = 8
SAM_BLUR_RADIUS = 10.0
#: The original's circular start on SAM's 28-cell grid: radii 0, 5, ..., 170 cells, disc blur 10 cells,
#: and the share of the probability drop that may remain (1%).
CIRCLE_RADII = tuple(range(0, 175, 5))
CIRCLE_SIGMA = 10.0
CIRCLE_THRESHOLD = 1e-2

#: SAM's comparison of MP masks: ``1 - m`` as it is (no rescaling), SSIM ``win_size=5``, ``data_range=1``.
MP_PIPELINE = PRESETS["sam2020_mp"]

# option -> (predicate, what it must be)
_RULES: dict[str, tuple[Any, str]] = {
    "n_iter": (lambda v: is_count(v, 0), "an int >= 0 (Adam steps)"),
    "blur_radius": (lambda v: v is None or (is_real(v) and v > 0), "a number of pixels > 0, or None (SAM's 10 px scaled)"),
    "mask_size": (lambda v: v is None or is_count(v), "a positive int (cells per side), or None (SAM's 28 scaled)"),
    "init": (lambda v: isinstance(v, str) and v in INITS, f"one of {', '.join(map(repr, INITS))}"),
    "learning_rate": (lambda v: is_real(v) and v > 0, "a number > 0"),
    "l1_coeff": (lambda v: is_real(v) and v >= 0, "a number >= 0"),
    "tv_coeff": (lambda v: is_real(v) and v >= 0, "a number >= 0"),
    "tv_beta": (lambda v: is_real(v) and v > 0, "a number > 0"),
}


def mp_settings(inputs: torch.Tensor, options: dict[str, Any]) -> dict[str, Any]:
    """The method's options with the defaults filled in and checked; ``blur_radius`` and
    ``mask_size`` resolved for the inputs' size. Refuses inputs that are not images."""
    modality = current_call().modality
    if inputs.dim() != 4 or (modality is not None and modality != "image"):
        kind = modality or f"inputs of shape {tuple(inputs.shape)}"
        raise SaliencyUsageError(
            f"{NAME} optimizes a blur mask over the pixels of images (N, C, H, W), but got {kind}. "
            "It is defined for images only: use occlusion, feature_ablation, lime or kernel_shap for other inputs."
        )
    o = {**METHODS[NAME].defaults, **{k: v for k, v in options.items() if k in METHODS[NAME].defaults}}
    for name, (ok, expected) in _RULES.items():
        if not ok(o[name]):
            raise SaliencyUsageError(f"{NAME}: option {name!r} must be {expected}, got {o[name]!r}.")
    side = min(inputs.shape[-2:])
    if o["blur_radius"] is None:
        o["blur_radius"] = SAM_BLUR_RADIUS * side / SAM_INPUT_SIZE
    if o["mask_size"] is None:
        o["mask_size"] = max(min(MIN_MASK_SIZE, side), round(SAM_MASK_SIZE * side / SAM_INPUT_SIZE))
    if o["mask_size"] > side:
        raise SaliencyUsageError(
            f"{NAME}: mask_size={o['mask_size']} cells is more than the images' {side} px side. "
            "Pass mask_size <= the smaller side, or None."
        )
    return o


def tv_norm(mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per mask (N, 1, g, g): the sum of ``|difference| ** beta`` over vertical and horizontal neighbours."""
    rows = (mask[:, 0, :-1, :] - mask[:, 0, 1:, :]).abs().pow(beta).flatten(1).sum(1)
    cols = (mask[:, 0, :, :-1] - mask[:, 0, :, 1:]).abs().pow(beta).flatten(1).sum(1)
    return rows + cols


def blended(mask: torch.Tensor, images: torch.Tensor, blurred: torch.Tensor) -> torch.Tensor:
    """The images where the upsampled mask is 1, their blurred copies where it is 0."""
    torch = require_torch()
    up = torch.nn.functional.interpolate(mask, size=tuple(images.shape[-2:]), mode="nearest")
    return (images * up + blurred * (1 - up)).to(images.dtype)


def target_probability(forward: Any, extra: Any, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The softmax probability (N,) of each row's target class in the selected scores (float32)."""
    torch = require_torch()
    scores = forward(x, *(extra or ()))
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise SaliencyUsageError(
            f"meaningful_perturbation drives the target's softmax probability down, but the model returns scores of "
            f"shape {tuple(scores.shape)}: the softmax of one score is always 1, so the mask would learn nothing from "
            "the model. Give the model (N, num_classes) scores with two or more classes, e.g. wrap a one-logit "
            "binary classifier to return torch.cat([-logit, logit], dim=1).")
    return torch.softmax(scores.float(), dim=1).gather(1, target.reshape(-1, 1))[:, 0]


def mp_losses(mask: torch.Tensor, images: torch.Tensor, blurred: torch.Tensor, forward: Any, extra: Any,
              target: torch.Tensor, o: dict[str, Any]) -> torch.Tensor:
    """SAM's loss of each image's mask (N,): L1 on the deleted area, TV, the target's probability."""
    prob = target_probability(forward, extra, blended(mask, images, blurred), target)
    l1 = (1 - mask).abs().flatten(1).sum(1)
    return float(o["l1_coeff"]) * l1 + float(o["tv_coeff"]) * tv_norm(mask, float(o["tv_beta"])) + prob


def optimize_masks(mask: torch.Tensor, images: torch.Tensor, blurred: torch.Tensor, forward: Any, extra: Any,
                   target: torch.Tensor, o: dict[str, Any]) -> torch.Tensor:
    """``n_iter`` Adam steps on the sum of the images' losses from ``mask`` (N, 1, g, g), each step
    followed by clamping to [0, 1]; returns the final masks (detached)."""
    torch = require_torch()
    mask = mask.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mask], lr=float(o["learning_rate"]))
    with torch.enable_grad():
        for _ in range(int(o["n_iter"])):
            loss = mp_losses(mask, images, blurred, forward, extra, target, o).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                mask.clamp_(0, 1)
    return mask.detach()


def random_masks(ids: Sequence[int], seed: int, size: int, options: dict[str, Any], device: Any) -> torch.Tensor:
    """SAM's random start: uniform [0, 1) cells, one generator per image seeded by
    :func:`image_seed` (drawn on the CPU, so the same on every device)."""
    torch = require_torch()
    rows = []
    for image in ids:
        generator = torch.Generator().manual_seed(image_seed(seed, image, NAME, options))
        rows.append(torch.rand((1, 1, size, size), generator=generator, dtype=torch.float32))
    return torch.cat(rows).to(device)


def disc_masks(size: int, radii: Sequence[float], sigma: float, device: Any) -> torch.Tensor:
    """Blurred discs (R, 1, g, g) of the given radii (cells) about the grid's centre (SAM's
    ``create_blurred_circular_mask``: ``x^2 + y^2 <= r^2`` from ``int(g / 2)``, then a Gaussian blur)."""
    torch = require_torch()
    centre = int(size / 2)
    offsets = torch.arange(size, dtype=torch.float32) - centre
    squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
    discs = torch.stack([(squared <= float(r) ** 2).float() for r in radii])[:, None]
    return gaussian_blur(discs, sigma=sigma).to(device)


def circular_masks(images: torch.Tensor, blurred: torch.Tensor, forward: Any, extra: Any, target: torch.Tensor,
                   size: int) -> torch.Tensor:
    """The original's start per image: ``1 - disc`` of the smallest radius whose deletion leaves less
    than 1% of the probability drop to the largest one (SAM's ``test_circular_masks``)."""
    torch = require_torch()
    scale = size / SAM_MASK_SIZE
    radii = [r * scale for r in CIRCLE_RADII]
    keep = 1 - disc_masks(size, radii, CIRCLE_SIGMA * scale, images.device)  # (R, 1, g, g)
    n = images.shape[0]
    with torch.no_grad():
        original = target_probability(forward, extra, images, target)
        scores = torch.stack([target_probability(forward, extra, blended(k.expand(n, -1, -1, -1), images, blurred),
                                                 target) for k in keep], dim=1)
    last = scores[:, -1:]
    share = (scores - last) / (original[:, None] - last)
    below = share < CIRCLE_THRESHOLD  # NaN (no drop at all) is never below: the largest radius
    first = torch.where(below.any(1), below.float().argmax(1), torch.full_like(original, len(radii) - 1).long())
    return keep[first]


def meaningful_perturbation(model: Any, inputs: torch.Tensor, target: torch.Tensor | None, options: dict[str, Any],
                            *, seed: int, ids: Sequence[int], batched: bool | None = None) -> torch.Tensor:
    """The maps ``1 - m`` (N, 1, H, W) of one chunk of images at ``ids`` of the check's inputs.

    ``batched=None``: on an accelerator the chunk's masks are optimized together; on the CPU one
    image at a time, since batched kernels round differently from one-image ones (about 1e-7 on
    the tiny test CNN) and the package promises maps that do not depend on the batch bit for bit
    on the CPU. ``True`` / ``False`` force either (the tests run the batched path on the CPU).
    """
    torch = require_torch()
    o = mp_settings(inputs, options)
    n = inputs.shape[0]
    forward, extra = captum_forward(model, list(ids), n)
    images = inputs.detach()
    blurred = gaussian_blur(images.float(), sigma=float(o["blur_radius"])).to(images.dtype)
    if target is None:
        with torch.no_grad():
            target = forward(images, *(extra or ())).argmax(1)
    target = target.reshape(-1).expand(n).to(images.device)
    if batched is None:
        batched = images.device.type != "cpu"
    groups = [slice(0, n)] if batched else [slice(i, i + 1) for i in range(n)]
    masks = []
    for rows in groups:
        part = None if extra is None else tuple(e[rows] for e in extra)
        if o["init"] == "random":
            start = random_masks(list(ids)[rows], seed, int(o["mask_size"]), options, images.device)
        else:
            start = circular_masks(images[rows], blurred[rows], forward, part, target[rows], int(o["mask_size"]))
        masks.append(optimize_masks(start, images[rows], blurred[rows], forward, part, target[rows], o))
    up = torch.nn.functional.interpolate(torch.cat(masks), size=tuple(images.shape[-2:]), mode="nearest")
    return (1 - up).to(images.dtype)


__all__ = [
    "CIRCLE_RADII", "INITS", "MP_PIPELINE", "blended", "circular_masks", "disc_masks", "meaningful_perturbation",
    "mp_losses", "mp_settings", "optimize_masks", "random_masks", "tv_norm",
]
