"""The noise floor of the randomization checks: two uninformative controls on the same inputs.

Binder et al. (CVPR 2023, "Shortcomings of top-down randomization-based sanity checks") show that
maps carrying no information about the model can score well in a randomization test: a map of
i.i.d. noise, drawn afresh for every model state, changes completely with every layer. A
randomization result therefore reports, next to the method's S^I, the same statistic for

``edge``
    a model-independent map (an edge detector, as Adebayo et al.'s Fig. 1; the input's magnitude
    for feature vectors, series and text): identical in every model state, so similarity 1 and
    S^I = 0 by construction, whatever the inputs. The floor a method must clear.
``random``
    i.i.d. Gaussian maps of the maps' shape, drawn per example and per model state (seeded by the
    check's seed and the example's index, so a loader draws what a tensor draws), put through the
    same pipeline and compared by the same similarity: the S^I of pure noise, the ceiling an
    uninformative map reaches.

and the method's own noise floor: how much its maps of the *unchanged* model move when it is run
again with another seed (``repeat``: 1 - similarity of the two runs' maps). A deterministic method
repeats itself exactly (0, not computed); a stochastic one (SmoothGrad, a custom explainer) does
not, and an explainer that returns fresh noise at every call changes as much between two runs as
between model states. ``require_above_controls=True`` asks the method's S^I interval to clear both
the edge control's S^I and its own repeat level by the sensitivity threshold (see
:func:`above_controls`): the randomized layers must change the maps more than running the method
again does.

The report also says how structured the original maps are: the mean entropy of their histograms
(:func:`pytest_saliency.compare.complexity.discrete_entropy`) against the noise control's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..compare.complexity import discrete_entropy
from ..core.rng import derive_seed, torch_seed_of
from ..core.stream import example_offset
from ..core.torchtools import require_torch
from ..engine.base import Explanation
from ..maps.methods import draws_random
from ..maps.postprocess import MapPipeline, pipeline_maps
from ..reporting.numbers import format_score

if TYPE_CHECKING:
    import torch

CONTROLS = ("edge", "random")


@dataclass
class ControlScores:
    """Per image of one batch: the random control's similarity per state (states, n), and the
    entropy of the method's and of the random control's original maps (n,)."""

    random: torch.Tensor
    entropy_method: torch.Tensor
    entropy_random: torch.Tensor
    repeat: torch.Tensor | None = None  # the similarity of two runs of the method on the same model (n,)


def sensitivity_of(similarity: torch.Tensor, clip_negative: bool) -> torch.Tensor:
    """S = 1 - similarity, negative similarities clipped to 0 first when ``clip_negative`` (as
    the randomization statistics read a method's similarities)."""
    return 1.0 - (similarity.clamp_min(0.0) if clip_negative else similarity)


def second_run(explanation: Explanation, x: torch.Tensor, target: torch.Tensor, ids: list[int]) -> torch.Tensor | None:
    """Raw maps of ``x`` from a second run of the method with another seed, the model as it is
    now (the method's own noise floor); None for a method of the package that draws no random
    numbers, whose second run would repeat the first exactly."""
    if explanation.named and not draws_random(explanation.method, explanation.options):  # type: ignore[arg-type]
        return None
    again = replace(explanation, seed=derive_seed(explanation.seed, "repeat"), cache=None)
    return again.maps(x, target, ids)


def _noise(maps: torch.Tensor, seed: int, state: int, first: int) -> torch.Tensor:
    """i.i.d. N(0, 1) raw maps shaped for the pipeline to give maps like ``maps`` (n, H, W): an
    image's (n, 1, H, W), a one-row map's (n, W); each example's from its own seed."""
    torch = require_torch()
    start = example_offset() + first
    rows = []
    for row in range(maps.shape[0]):
        generator = torch.Generator().manual_seed(torch_seed_of(derive_seed(seed, "random_control", state, start + row)))
        rows.append(torch.randn(maps[0].numel(), generator=generator, dtype=torch.float64))
    noise = torch.stack(rows).to(device=maps.device, dtype=maps.dtype)
    return noise.reshape(maps.shape[0], 1, *maps.shape[1:]) if maps.shape[1] > 1 else noise


def _similarity(original: torch.Tensor, state: torch.Tensor, setup: Any, similarity: str,
                valid: torch.Tensor | None) -> torch.Tensor:
    from ..compare.metrics import compute_on_valid
    from ..compare.similarity import ssim_unchecked

    if similarity == "ssim":
        return ssim_unchecked(original, state[None], setup)[0]
    return compute_on_valid(similarity, original, state, valid).nan_to_num(nan=0.0)


def control_scores(original: torch.Tensor, states: int, pipeline: MapPipeline, setup: Any, similarity: str,
                   valid: torch.Tensor | None, seed: int, first: int,
                   repeated: torch.Tensor | None = None) -> ControlScores:
    """The random control and the entropies for one batch of a randomization check whose
    method's original maps are ``original`` (n, H, W), over ``states`` model states; ``first``
    is the index of the batch's first image among the check's inputs; ``repeated`` the maps of
    a second run of the method on the same model (None: a deterministic method)."""
    torch = require_torch()
    noise_original = pipeline_maps(_noise(original, seed, 0, first), pipeline)
    columns = [_similarity(noise_original, pipeline_maps(_noise(original, seed, state, first), pipeline), setup,
                           similarity, valid) for state in range(1, states + 1)]
    mask = None if valid is None else valid.reshape(original.shape[0], -1)
    return ControlScores(
        random=torch.stack(columns).double().cpu(),
        entropy_method=discrete_entropy(original, valid=mask).double().cpu(),
        entropy_random=discrete_entropy(noise_original, valid=mask).double().cpu(),
        repeat=None if repeated is None else _similarity(original, repeated, setup, similarity, valid).double().cpu(),
    )


@dataclass(frozen=True)
class Floor:
    """The controls' S^I and the structure of the maps, as a result reports them."""

    edge: float  # S^I of the model-independent control: 0 by construction
    random: float  # S^I of i.i.d. noise maps
    entropy_method: float  # mean entropy (nats) of the method's original maps
    entropy_random: float  # mean entropy of the noise maps after the same pipeline
    repeat: float = 0.0  # mean S (1 - similarity) of two runs of the method on the unchanged model

    def position(self, score: float) -> float:
        """Where the method's S^I sits between the edge control (0) and noise (1)."""
        span = self.random - self.edge
        return (score - self.edge) / span if span > 0 else float("nan")

    @property
    def structure(self) -> float:
        """The method's entropy as a share of noise's (1: as unstructured as noise)."""
        return self.entropy_method / self.entropy_random if self.entropy_random > 0 else float("nan")

    def to_dict(self) -> dict[str, float]:
        return {"edge": self.edge, "random": self.random, "repeat": self.repeat,
                "entropy_method": self.entropy_method, "entropy_random": self.entropy_random,
                "structure": self.structure}


def floor_of(random_scores: Any, entropy_method: Any, entropy_random: Any, repeat_scores: Any = ()) -> Floor:
    """The :class:`Floor` of the controls' per-image numbers: ``random_scores`` the random
    control's S^i per image (1 - mean similarity over the states, negative similarities clipped
    as the method's are by default), ``repeat_scores`` each image's S between two runs of the
    method (empty for a deterministic method: 0)."""
    torch = require_torch()
    scores = torch.as_tensor(random_scores, dtype=torch.float64)
    repeat = torch.as_tensor(list(repeat_scores), dtype=torch.float64)
    return Floor(edge=0.0, random=float(scores.mean()) if scores.numel() else float("nan"),
                 entropy_method=float(torch.as_tensor(entropy_method, dtype=torch.float64).mean()),
                 entropy_random=float(torch.as_tensor(entropy_random, dtype=torch.float64).mean()),
                 repeat=float(repeat.mean()) if repeat.numel() else 0.0)


def floor_lines(floor: Floor, score: float, above: bool, required: bool) -> list[str]:
    """The report's lines on the noise floor: the controls' S^I, where the method's ``score``
    sits between them, and the structure of its maps against noise's."""
    verdict = "clearly above them" if above else "NOT clearly above them"
    return [
        f"  controls:    S^I edge detector {format_score(floor.edge)} (model-independent), i.i.d. noise maps "
        f"{format_score(floor.random)}; this method {format_score(score)}, "
        f"{format_score(floor.position(score))} of the way from the edge detector to noise",
        f"  own noise:   running the method again on the unchanged model moves its maps by S = "
        f"{format_score(floor.repeat)}; the randomized layers must move them more: {verdict}"
        f"{' (required)' if required else ''}",
        f"  structure:   entropy of the original maps {floor.entropy_method:.3f} nats vs noise "
        f"{floor.entropy_random:.3f} ({floor.structure:.2f} of it)",
    ]


def above_controls(ci_low: float, sensitivity_threshold: float, floor: Floor) -> bool:
    """Clearly above the controls: the lower end of the method's S^I interval clears both the edge
    control's S^I and the method's own repeat level by the sensitivity threshold."""
    return ci_low >= max(floor.edge, floor.repeat) + sensitivity_threshold


__all__ = ["CONTROLS", "ControlScores", "Floor", "above_controls", "control_scores", "floor_lines", "second_run", "sensitivity_of",
           "floor_of"]
