"""Insertion / deletion (RISE definitions, SAM's AUC) and the spread of accuracy across sweeps (V8).

The batched implementation is checked against a plain loop that follows the RISE code step by
step (one image, one forward pass per step, pixels ordered by ``(-score, index)``), on
hypothesis-generated images, maps full of ties, steps and substrates.
"""

from __future__ import annotations

import copy
import json
import math

import captum.attr  # noqa: F401  (it raises the recursion limit on import; hypothesis warns if that happens mid-test)
import numpy as np
import pytest
import torch
from conftest import make_tiny_cnn, tiny_images
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter
from sklearn import metrics as sk_metrics
from torch import nn

from pytest_saliency import explain
from pytest_saliency.checks.faithfulness import (
    accuracy_spread,
    area_under_curve,
    causal_curves,
    default_blur_sigma,
    deletion,
    gaussian_blur,
    insertion,
)
from pytest_saliency.checks.sweeps import hyperparameter_sweep
from pytest_saliency.exceptions import SaliencyUsageError

HYP = settings(deadline=None, max_examples=40)


def small_model(channels: int, height: int, width: int, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(channels, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * height * width, 4)
        )
    return model.eval()


def loop_reference(model, image, scores, mode, step, substrate, target, normalize):
    """RISE's CausalMetric.single_run, written as a loop over steps and pixels."""
    h, w = image.shape[1:]
    pixels = h * w
    order = sorted(range(pixels), key=lambda p: (-scores[p], p))
    current = image.clone() if mode == "deletion" else substrate.clone()
    finish = substrate if mode == "deletion" else image
    n_steps = (pixels + step - 1) // step
    probabilities = []
    for i in range(n_steps + 1):
        with torch.no_grad():
            probabilities.append(float(torch.softmax(model(current[None]).double(), dim=1)[0, target]))
        for p in order[i * step:(i + 1) * step]:
            row, col = divmod(p, w)
            current[:, row, col] = finish[:, row, col]
    xs = [min(i * step, pixels) / pixels for i in range(n_steps + 1)]
    auc = sum((probabilities[i] + probabilities[i + 1]) / 2 * (xs[i + 1] - xs[i]) for i in range(n_steps))
    if normalize == "max":
        auc /= max(probabilities)
    return probabilities, auc


@HYP
@given(
    channels=st.integers(1, 2), height=st.integers(2, 5), width=st.integers(2, 5), n=st.integers(1, 3),
    data=st.data(), mode=st.sampled_from(["deletion", "insertion"]), order=st.sampled_from(["signed", "absolute"]),
    substrate=st.sampled_from(["zero", "blur", 0.5]), normalize=st.sampled_from(["max", None]),
    batch_size=st.integers(1, 40),
)
def test_batched_curves_equal_a_plain_loop(channels, height, width, n, data, mode, order, substrate, normalize, batch_size):
    model = small_model(channels, height, width, seed=height * 10 + width)
    generator = torch.Generator().manual_seed(channels + 7 * n)
    x = torch.rand(n, channels, height, width, generator=generator)
    # integer-valued attributions: many ties, zeros and negative values
    values = data.draw(st.lists(st.integers(-2, 2), min_size=x.numel(), max_size=x.numel()))
    attributions = torch.tensor(values, dtype=torch.float32).reshape(x.shape)
    step = data.draw(st.integers(1, height * width))
    result = causal_curves(model, x, attributions, mode, order=order, step=step, substrate=substrate,
                           normalize=normalize, batch_size=batch_size)
    targets = model(x).argmax(1)
    for i in range(n):
        if order == "signed":
            scores = attributions[i].sum(0).flatten().tolist()
        else:
            scores = attributions[i].abs().sum(0).flatten().tolist()
        if substrate == "zero":
            fill = torch.zeros_like(x[i])
        elif substrate == "blur":
            sigma = default_blur_sigma(height, width)
            fill = torch.from_numpy(np.stack([
                gaussian_filter(ch.double().numpy(), sigma, mode="nearest", truncate=3.0) for ch in x[i]
            ])).float()
        else:
            fill = torch.full_like(x[i], 0.5)
        curve, auc = loop_reference(model, x[i], scores, mode, step, fill, int(targets[i]), normalize)
        assert result.curves[i].tolist() == pytest.approx(curve, abs=1e-5)
        assert float(result.auc[i]) == pytest.approx(auc, abs=1e-5)
    assert result.targets == targets.tolist()
    assert result.fractions[0] == 0 and result.fractions[-1] == 1


def test_auc_matches_the_sam_code_when_the_step_divides_the_image():
    """SAM's RISE_evaluation.auc: sklearn.metrics.auc(arange(n) / (n - 1), scores) / scores.max()."""
    model, x = make_tiny_cnn(), tiny_images(3)
    result = deletion(model, x, explain(model, x, "saliency"))
    assert result.step == 16 and result.curves.shape == (3, 17)  # default step: one image row of 16 px
    for curve, auc in zip(result.curves.numpy(), result.auc.numpy()):
        xs = np.arange(len(curve)) / (len(curve) - 1)
        assert auc == pytest.approx(sk_metrics.auc(xs, curve) / curve.max(), abs=1e-12)
    raw = deletion(model, x, explain(model, x, "saliency"), normalize=None)
    for curve, auc in zip(raw.curves.numpy(), raw.auc.numpy()):  # RISE's own auc()
        assert auc == pytest.approx((curve.sum() - curve[0] / 2 - curve[-1] / 2) / (len(curve) - 1), abs=1e-12)


def test_gaussian_blur_equals_scipy_and_keeps_constants():
    x = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.5, 1.0, 1.1, 2.3):
        expected = np.stack([[gaussian_filter(ch, sigma, mode="nearest", truncate=3.0) for ch in img] for img in x.numpy()])
        assert np.allclose(gaussian_blur(x, sigma).numpy(), expected, atol=1e-12)
    constant = torch.full((1, 1, 5, 5), 0.3)
    assert torch.allclose(gaussian_blur(constant, 4.0), constant)
    assert default_blur_sigma(224, 224) == 5.0 and default_blur_sigma(32, 32) == 1.0
    with pytest.raises(SaliencyUsageError, match="blur sigma must be a positive number"):
        gaussian_blur(x, -1.0)
    with pytest.raises(SaliencyUsageError, match=r"needs a floating tensor of shape \(N, C, H, W\)"):
        gaussian_blur(x[0], 1.0)


def test_curves_start_and_end_where_the_games_say():
    model, x = make_tiny_cnn(), tiny_images(4)
    attributions = explain(model, x, "saliency")
    probabilities = torch.softmax(model(x).double(), dim=1).max(dim=1).values.detach()
    blank = torch.softmax(model(torch.zeros_like(x)).double(), dim=1).detach()
    targets = model(x).argmax(1)
    d, i = deletion(model, x, attributions), insertion(model, x, attributions)
    assert torch.allclose(d.curves[:, 0], probabilities) and torch.allclose(i.curves[:, -1], probabilities)
    assert torch.allclose(d.curves[:, -1], blank[range(4), targets]) and torch.allclose(i.curves[:, 0], d.curves[:, -1])
    assert ((d.auc >= 0) & (d.auc <= 1)).all() and ((i.auc >= 0) & (i.auc <= 1)).all()
    assert "lower is better" in d.summary() and "higher is better" in i.summary()
    json.dumps(d.to_dict())
    assert torch.equal(deletion(model, x, "saliency").curves, d.curves)  # a method name is explained first
    blurred = insertion(model, x, attributions, substrate="blur")
    assert blurred.substrate == "blur(sigma=1)"
    assert area_under_curve(torch.zeros(1, 3), torch.tensor([0.0, 0.5, 1.0])).item() == 0.0


def test_feature_vectors_delete_one_feature_per_step():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(5, 6, generator=torch.Generator().manual_seed(1))
    result = deletion(model, x, explain(model, x, "saliency"))
    assert result.step == 1 and result.curves.shape == (5, 7)
    with pytest.raises(SaliencyUsageError, match="substrate='blur' needs images"):
        insertion(model, x, x, substrate="blur")


def test_the_plain_gradient_deletes_the_evidence_faster_than_a_random_map(digits):
    model, x, _ = digits
    x = x[:24]
    gradient = deletion(model, x, explain(model, x, "saliency"))
    random_map = deletion(model, x, torch.rand(x.shape, generator=torch.Generator().manual_seed(0)))
    assert gradient.mean_auc < random_map.mean_auc - 0.1, (gradient.mean_auc, random_map.mean_auc)
    assert (gradient.auc < random_map.auc).float().mean() > 0.8
    integrated = deletion(model, x, explain(model, x, "integrated_gradients", n_steps=16))
    assert integrated.mean_auc < random_map.mean_auc


def test_games_leave_the_model_and_the_global_rng_alone():
    model, x = make_tiny_cnn(), tiny_images(3)
    model.train()
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    deletion(model, x, torch.rand(x.shape, generator=torch.Generator().manual_seed(0)))
    insertion(model, x, "smoothgrad", nt_samples=3, substrate="blur")
    assert torch.equal(torch.rand(1), expected)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_lime_accuracy_varies_more_with_the_superpixel_count_than_with_the_seed(digits):
    """V8 (SAM 4.6): the number of superpixels moves LIME's insertion/deletion AUC far more than its seed."""
    model, x, _ = digits
    x = x[:8]
    sweep = hyperparameter_sweep(  # 4, 16 and 64 grid superpixels vs three seeds
        model, x, "lime", sweep={"seed": [1, 2], "grid": [2, 8]}, reference={"grid": 4, "n_samples": 64},
        metrics=(), keep_attributions=True,
    )
    spread = accuracy_spread(model, x, sweep)
    for score in ("deletion", "insertion"):
        assert spread.ratio("grid", "seed", score) > 3, (score, spread.report())
    assert [r.hyperparameter for r in spread.ranking("insertion")] == ["grid", "seed"]
    assert "grid changes" in spread.summary()
    report = spread.report()
    assert "std_of_means" in report and "SAM 4.6" in report
    json.dumps(spread.to_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(step=0), r"step must be an int >= 1, got 0"),
        (dict(step=2.5), r"step must be an int >= 1, got 2.5"),
        (dict(step=10_000), r"step=10000 changes more positions per step than the \d+ each input has"),
        (dict(order="random"), r"unknown pixel order 'random'"),
        (dict(mode="erase"), r"unknown mode 'erase'"),
        (dict(probability="logits"), r"unknown probability 'logits'"),
        (dict(output="softmax"), r"output= selects the scores.*probability='softmax'"),
        (dict(normalize="sum"), r"unknown AUC normalization 'sum'"),
        (dict(substrate="noise"), r"unknown substrate 'noise'"),
        (dict(substrate=torch.zeros(2, 2)), r"cannot be broadcast"),
        (dict(batch_size=0), r"batch_size must be an int >= 1, got 0"),
        (dict(attributions=torch.zeros(3, 1, 8, 8)), r"do not match inputs of shape"),
        (dict(attributions=torch.zeros(2, 1, 16, 16)), r"attributions hold 2 maps for 3 inputs"),
        (dict(attributions=torch.full((3, 1, 16, 16), float("nan"))), r"NaN or infinite"),
        (dict(attributions=torch.zeros(3, 1, 16, 16, dtype=torch.long)), r"must be a floating torch.Tensor"),
        (dict(nt_samples=4), r"method options \['nt_samples'\] were given with precomputed attributions"),
    ],
)
def test_bad_arguments_raise_usage_errors(kwargs, message):
    model, x = make_tiny_cnn(), tiny_images(3)
    attributions = kwargs.pop("attributions", torch.rand(3, 1, 16, 16))
    mode = kwargs.pop("mode", "deletion")
    with pytest.raises(SaliencyUsageError, match=message):
        causal_curves(model, x, attributions, mode, **kwargs)


def test_bad_accuracy_spread_arguments():
    model, x = make_tiny_cnn(), tiny_images(2)
    plain = hyperparameter_sweep(model, x, "integrated_gradients", sweep={"n_steps": [4]}, metrics="ssim")
    with pytest.raises(SaliencyUsageError, match="keep_attributions=True"):
        accuracy_spread(model, x, plain)
    kept = hyperparameter_sweep(model, x, "integrated_gradients", sweep={"n_steps": [4]}, metrics=(),
                                keep_attributions=True)
    with pytest.raises(SaliencyUsageError, match="come from the SweepResult"):
        accuracy_spread(model, x, kept, sweep={"n_steps": [8]})
    with pytest.raises(SaliencyUsageError, match="explained 2 images but 3 inputs"):
        accuracy_spread(model, tiny_images(3), kept)
    with pytest.raises(SaliencyUsageError, match="unknown accuracy score 'pointing'"):
        accuracy_spread(model, x, kept, scores=("pointing",))
    reused = accuracy_spread(model, x, kept)
    direct = accuracy_spread(model, x, "integrated_gradients", sweep={"n_steps": [4]})
    assert [r.to_dict() for r in reused.rows] == [r.to_dict() for r in direct.rows]
    assert math.isfinite(reused.rows[0].std_of_means) and len(reused.rows[0].values) == 2  # reference + 4 steps


def test_accuracy_spread_checks_every_option_before_the_sweep_runs():
    model, x = make_tiny_cnn(), tiny_images(2)
    calls = []

    def counting(model, inputs, target, scale=1.0):
        calls.append(scale)
        return inputs * scale

    for options, message in [
        ({"order": "sgned"}, r"unknown pixel order 'sgned'"),
        ({"probability": "probabilities"}, r"unknown probability 'probabilities'"),
        ({"normalize": ["max"]}, r"unknown AUC normalization \['max'\]"),
        ({"curve_batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
        ({"step": 0}, r"step must be an int >= 1, got 0"),
        ({"include_reference": "yes"}, r"include_reference must be True or False"),
        ({"seed": 1.5}, r"seed must be an integer"),
        ({"scores": ("deletion", "pointing")}, r"unknown accuracy score 'pointing'"),
    ]:
        with pytest.raises(SaliencyUsageError, match=message):
            accuracy_spread(model, x, counting, sweep={"scale": [2.0]}, **options)
    assert calls == []
    with pytest.raises(SaliencyUsageError, match=r"inputs must be a floating-point tensor"):
        accuracy_spread(model, (x * 255).long(), counting, sweep={"scale": [2.0]})
    spread = accuracy_spread(model, x, counting, sweep={"scale": [2.0]}, scores="deletion")
    assert {row.score for row in spread.rows} == {"deletion"}


# --------------------------------------------------------------------------------------------
# token inputs: padding is not part of the game; tokens turned into padding are masked out
# --------------------------------------------------------------------------------------------

PAD, UNKNOWN = 0, 1


class TokenCounter(nn.Module):
    """Class 1's score is the number of tokens the model reads: with an attention mask, the
    attended positions; without one, the positions that hold neither padding nor the unknown
    token. Every input it is run on is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(12, 1)  # read, but weighted by 0: the score is the count
        self.seen: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(ids.clone())
        read = attention_mask.bool() if attention_mask is not None else (ids != PAD) & (ids != UNKNOWN)
        count = read.sum(dim=1).float() + 0.0 * self.embedding(ids).sum(dim=(1, 2))
        return torch.stack([torch.zeros_like(count), count], dim=1)


def _padded_texts() -> tuple[torch.Tensor, list[int]]:
    lengths = [5, 3, 6]
    ids = torch.full((3, 6), PAD)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.arange(4, 4 + length)
    return ids, lengths


def test_padding_is_never_deleted_and_the_fraction_counts_tokens_only():
    """Maps that rank the padding first: it is still never changed (every input the model sees
    keeps its padding), each input's curve falls from its first step, and the x axis is the
    fraction of that input's own tokens."""
    from pytest_saliency import Text

    ids, lengths = _padded_texts()
    model = TokenCounter()
    padding_first = (ids == PAD).float() * 10 + torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    result = deletion(model, ids, padding_first, target=1, modality=Text(pad_token_id=PAD, baseline_token=UNKNOWN))
    assert result.curves.shape == (3, 7) and result.fractions.shape == (3, 7)
    for row, length in enumerate(lengths):
        changed = torch.arange(7).clamp(max=length)
        expected = torch.sigmoid((length - changed).double())  # softmax of [0, tokens left]
        torch.testing.assert_close(result.curves[row], expected)
        torch.testing.assert_close(result.fractions[row], changed.double() / length)
    perturbed = torch.cat(model.seen)[-21:].reshape(3, 7, 6)  # the game's inputs: 7 steps of each input
    assert torch.equal(perturbed == PAD, (ids == PAD)[:, None].expand(3, 7, 6))  # padding never changes
    deleted = (perturbed == UNKNOWN).sum(dim=2)
    assert torch.equal(deleted, torch.stack([torch.arange(7).clamp(max=length) for length in lengths]))
    same_length = deletion(model, ids[:1], padding_first[:1], target=1, modality=Text(pad_token_id=PAD))
    assert same_length.fractions.shape == (6,)  # one input (or inputs of one length): one x axis
    with pytest.raises(SaliencyUsageError, match=r"input\(s\) \[0\] hold only padding"):
        deletion(model, torch.full((1, 6), PAD), padding_first[:1], modality=Text(pad_token_id=PAD))


def test_tokens_replaced_by_the_pad_token_are_masked_out_and_a_mask_token_stays_attended():
    """With an attention mask, a model that counts attended tokens: deletion to the pad token
    (the default baseline) removes the tokens, so the mask follows and the score falls; deletion
    to another token (a [MASK]) replaces them, they stay attended, and the score stays."""
    from pytest_saliency import Text

    ids, lengths = _padded_texts()
    mask = (ids != PAD).long()
    order = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1))
    options = dict(target=1, forward_kwargs={"attention_mask": mask})
    removed = deletion(TokenCounter(), ids, order, modality=Text(pad_token_id=PAD), **options)
    replaced = deletion(TokenCounter(), ids, order, modality=Text(pad_token_id=PAD, baseline_token=UNKNOWN), **options)
    inserted = insertion(TokenCounter(), ids, order, modality=Text(pad_token_id=PAD), **options)
    assert removed.substrate == f"token {PAD}" and replaced.substrate == f"token {UNKNOWN}"
    for row, length in enumerate(lengths):
        changed = torch.arange(7).clamp(max=length)
        torch.testing.assert_close(removed.curves[row], torch.sigmoid((length - changed).double()))
        torch.testing.assert_close(inserted.curves[row], torch.sigmoid(changed.double()))
        torch.testing.assert_close(replaced.curves[row], torch.sigmoid(torch.full((7,), float(length), dtype=torch.float64)))
    assert (removed.auc < replaced.auc).all()
    assert torch.equal(mask, (ids != PAD).long())  # the caller's mask is left as it was
