"""Reference inputs the methods compare against: IG and DeepLift baselines (zero, uniform, blurred), the
blur substrate of the causal curves, and SLIC superpixels as feature masks for LIME and KernelSHAP.

Each is one draw per input, on the inputs' device; the uniform draw depends on the input's index in
the user's inputs and the seed only (see :func:`uniform_baselines`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..core.rng import seeded
from ..core.torchtools import require_torch
from ..core.validation import check_count, is_real
from ..exceptions import SaliencyUsageError
from .methods import image_ids, image_seed

if TYPE_CHECKING:
    import torch

#: The side of SAM's 224 x 224 inputs, against which its pixel-sized settings are scaled.
SAM_INPUT_SIZE = 224


#: RISE's insertion blur: sigma 5 px on 224 x 224 images; scaled to the input size here.
RISE_BLUR_SIGMA_224 = 5.0


def default_blur_sigma(height: int, width: int) -> float:
    """RISE's 5 px blur on 224 px images, scaled to ``min(height, width)``, at least 1 px."""
    return max(1.0, RISE_BLUR_SIGMA_224 * min(height, width) / 224.0)


def gaussian_blur(images: torch.Tensor, sigma: float | None = None, radius: int | None = None) -> torch.Tensor:
    """Blur (N, C, H, W) images channel by channel with a separable Gaussian, in torch.

    ``sigma`` in pixels (default :func:`default_blur_sigma`), ``radius`` defaults to
    ``int(3 sigma + 0.5)``; the kernel is normalized to sum 1 and edges are padded by replication
    (scipy's ``gaussian_filter(mode="nearest", truncate=3.0)``), so a constant image stays
    constant. Runs on the images' device and dtype.
    """
    torch = require_torch()
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise SaliencyUsageError(
            f"gaussian_blur needs a floating tensor of shape (N, C, H, W), got "
            f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}. Blurring is only defined for images; "
            "use substrate='zero' or a constant for (N, D) feature vectors."
        )
    h, w = images.shape[-2:]
    sigma = default_blur_sigma(h, w) if sigma is None else sigma
    if not (is_real(sigma) and sigma > 0):
        raise SaliencyUsageError(f"blur sigma must be a positive number of pixels, got {sigma!r}.")
    radius = int(3.0 * float(sigma) + 0.5) if radius is None else check_count(radius, "blur radius", minimum=0)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / float(sigma)) ** 2)
    kernel = kernel / kernel.sum()
    n, c = images.shape[:2]
    x = images.reshape(n * c, 1, h, w)
    x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.reshape(n, c, h, w)


def blurred_baseline(inputs: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """A Gaussian-blurred copy of each input (IG's "blurred" baseline); sigma = min(H, W) / 16 by default."""
    if inputs.dim() != 4:
        raise SaliencyUsageError(
            "baselines='blurred' needs images (N, C, H, W); for (N, D) feature vectors use 'zero' or 'uniform'."
        )
    return gaussian_blur(inputs, sigma if sigma is not None else max(1.0, min(inputs.shape[-2:]) / 16.0))


def slic_feature_masks(
    inputs: torch.Tensor, n_segments: int, compactness: float = 30.0, sigma: float | None = None
) -> torch.Tensor:
    """Per-image SLIC superpixels as an integer feature mask of shape (N, 1, H, W), labels 0..S-1.

    SAM's LIME used ``n_segments=50, compactness=30, sigma=3`` on 224 px images; sigma is scaled
    to the input's smaller side here. Images are min-max scaled over the whole batch (grey images
    to [0, 100]), but scikit-image rescales each image to its own [0, 1] range before segmenting
    (and before the Lab conversion of 3-channel images), so the masks depend on each image alone
    and ``compactness`` means what scikit-image documents. SLIC returns about ``n_segments``
    segments (fewer on small images); labels are made contiguous.
    Runs scikit-image on the CPU, one image at a time.
    """
    torch = require_torch()
    from skimage.segmentation import slic

    if inputs.dim() != 4:
        raise SaliencyUsageError("SLIC superpixels need images (N, C, H, W).")
    c, h, w = inputs.shape[1:]
    if sigma is None:
        sigma = 3.0 * min(h, w) / SAM_INPUT_SIZE
    low, high = float(inputs.min()), float(inputs.max())
    scaled = ((inputs.detach() - low) / ((high - low) or 1.0)).permute(0, 2, 3, 1).cpu().double().numpy()
    masks = []
    for image in scaled:
        if c == 1:
            labels = slic(image[..., 0] * 100.0, n_segments=n_segments, compactness=compactness, sigma=sigma,
                          channel_axis=None, start_label=0)
        else:
            labels = slic(image, n_segments=n_segments, compactness=compactness, sigma=sigma, channel_axis=-1,
                          convert2lab=(c == 3), start_label=0)
        labels = torch.as_tensor(labels.astype("int64"))
        masks.append(torch.unique(labels, return_inverse=True)[1])
    return torch.stack(masks)[:, None].to(inputs.device)


def _image_ranges(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each input's own minimum and maximum, shaped to broadcast over its values."""
    flat = inputs.flatten(1)
    shape = (-1,) + (1,) * (inputs.dim() - 1)
    return flat.amin(1).view(shape), flat.amax(1).view(shape)


def zero_or(value: Any, inputs: torch.Tensor) -> Any:
    """Baselines by name: ``"zero"`` (black), ``"uniform"`` (noise over each input's own range, drawn
    from the global generator, which :func:`pytest_saliency.maps.explainers.run_captum` seeds per
    image) or ``"blurred"`` (a Gaussian blur of the input); a number is used as given, and a tensor
    (checked by :func:`pytest_saliency.maps.options.check_baselines`) is expanded to the inputs'
    shape (a baseline per input must have as many rows as ``inputs``: ``run_captum`` takes the
    rows of the inputs it explains)."""
    torch = require_torch()
    if isinstance(value, torch.Tensor):
        if value.dim() == inputs.dim() and value.shape[0] not in (1, inputs.shape[0]):  # one per input
            raise SaliencyUsageError(
                f"baselines has one row per input ({value.shape[0]}) but these {inputs.shape[0]} inputs are "
                "a part of them whose positions are not known here. Pass one baseline shared by all "
                f"inputs, of shape {tuple(inputs.shape[1:])}, or explain all inputs at once."
            )
        return value.expand_as(inputs)
    if value is None or (isinstance(value, str) and value == "zero"):
        return torch.zeros_like(inputs)
    if isinstance(value, str) and value == "blurred":
        return blurred_baseline(inputs)
    if isinstance(value, str) and value == "uniform":
        low, high = _image_ranges(inputs)
        return low + (high - low) * torch.rand_like(inputs)
    if isinstance(value, str):
        raise SaliencyUsageError(f"unknown baseline {value!r}; use 'zero', 'uniform', 'blurred' or a tensor.")
    return value


def uniform_baselines(inputs: torch.Tensor, seed: int, index: int | Sequence[int] | torch.Tensor, method: str,
                      options: dict[str, Any]) -> torch.Tensor:
    """One ``"uniform"`` baseline per input, drawn under that input's :func:`~pytest_saliency.maps.methods.image_seed`
    (its place in the user's inputs: ``index``, see :func:`~pytest_saliency.maps.methods.image_ids`): the
    draws :func:`pytest_saliency.maps.explainers.run_captum` makes, for code that builds the baselines
    itself. No global RNG state changes."""
    torch = require_torch()
    rows = []
    for row, image in enumerate(image_ids(index, inputs.shape[0])):
        with seeded(image_seed(seed, image, method, options), inputs.device, torch_only=True):
            rows.append(zero_or("uniform", inputs[row:row + 1]))
    return torch.cat(rows)


def uniform_baseline(inputs: torch.Tensor, seed: int = 0, *, index: int | Sequence[int] | torch.Tensor = 0,
                     method: str = "integrated_gradients") -> torch.Tensor:
    """One baseline per input, uniform over that input's own ``[min, max]``: the draw that
    ``explain(..., method, baselines="uniform", seed=seed)`` makes for the input at its index in
    the user's inputs (``index``: the first input's, or one per input), so an input's baseline
    does not depend on the other inputs. No global RNG state changes."""
    return uniform_baselines(inputs, seed, index, method, {})
