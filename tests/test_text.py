"""Text: token ids (N, L) explained at the embedding, one score per token, padding left out of the
comparisons; a transformer trained in seconds on a task decided by a trigger token."""

from __future__ import annotations

import warnings

import pytest
import scipy.stats
import torch
from torch import nn

import pytest_saliency as ps
from pytest_saliency import SaliencyCheckFailed, SaliencyUsageError
from pytest_saliency.compare.metrics import compute_on_valid

TRIGGER, PAD, UNKNOWN, VOCAB, LENGTH = 3, 0, 1, 20, 12


class TinyText(nn.Module):
    """An embedding, one transformer encoder layer (attention with in_proj_weight, which has no
    reset_parameters of its own), masked mean pooling and a linear head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embedding(ids), src_key_padding_mask=ids == PAD)
        keep = (ids != PAD).unsqueeze(-1).float()
        return self.head((hidden * keep).sum(1) / keep.sum(1).clamp(min=1))


def trigger_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences of 9 to 12 tokens, right-padded; the label is whether the trigger occurs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    lengths = torch.randint(LENGTH - 3, LENGTH + 1, (n,), generator=g)
    for i in range(n):
        if labels[i]:
            ids[i, int(torch.randint(0, int(lengths[i]), (1,), generator=g))] = TRIGGER
        ids[i, int(lengths[i]):] = PAD
    return ids, labels


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyText()
        ids, labels = trigger_task(256, 0)
        optimizer = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(40):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(ids), labels).backward()
            optimizer.step()
    model.eval()
    test_ids, test_labels = trigger_task(48, 1)
    with torch.no_grad():
        accuracy = (model(test_ids).argmax(1) == test_labels).float().mean().item()
    assert accuracy > 0.9, f"the text model did not learn the trigger task (test accuracy {accuracy:.2f})"
    return model, test_ids, test_labels


TEXT = ps.Text(pad_token_id=PAD)


@pytest.mark.parametrize("method, shape", [
    ("saliency", (4, LENGTH, 16)), ("input_x_gradient", (4, LENGTH, 16)), ("integrated_gradients", (4, LENGTH, 16)),
    ("occlusion", (4, LENGTH)), ("feature_ablation", (4, LENGTH)), ("kernel_shap", (4, LENGTH)),
])
def test_token_ids_are_explained_at_the_embedding(trained, method: str, shape: tuple[int, ...]) -> None:
    model, ids, _ = trained
    text = ps.Text(pad_token_id=PAD, baseline_token=UNKNOWN)  # a sequence of only padding pools to NaN
    raw = ps.explain(model, ids[:4], method, modality=text)
    assert raw.shape == shape and raw.dtype == torch.float32 and torch.isfinite(raw).all()
    maps = ps.explain(model, ids[:4], method, modality=text, preset="adebayo2018")
    assert maps.shape == (4, 1, LENGTH)  # one score per token


def test_integrated_gradients_at_the_embedding_is_captums_layer_method(trained) -> None:
    import captum.attr as ca

    model, ids, _ = trained
    target = model(ids[:4]).argmax(1)
    ours = ps.explain(model, ids[:4], "integrated_gradients", target=target, modality=ps.Text(baseline_token=PAD),
                      n_steps=8)
    expected = ca.LayerIntegratedGradients(model, model.embedding).attribute(
        ids[:4], baselines=torch.full_like(ids[:4], PAD), target=target, n_steps=8, method="gausslegendre")
    torch.testing.assert_close(ours, expected)


def test_the_maps_find_the_trigger(trained) -> None:
    """The ground truth of the task: on inputs that contain the trigger, the trigger token gets the
    largest integrated-gradients score."""
    model, ids, labels = trained
    positives = ids[labels == 1]
    maps = ps.explain(model, positives, "integrated_gradients", modality=TEXT, preset="adebayo2018")[:, 0]
    maps = maps.masked_fill(positives == PAD, -1.0)
    found = (maps.argmax(dim=1) == (positives == TRIGGER).float().argmax(dim=1)).float().mean().item()
    assert found >= 0.8, f"the trigger has the top score in only {found:.0%} of the inputs that contain it"


def test_randomizing_the_transformer_changes_the_maps_and_a_control_fails(trained) -> None:
    model, ids, _ = trained
    result = ps.layer_randomization(model, ids, "integrated_gradients", modality=TEXT, n_steps=8)
    assert result.passed and result.similarity == "spearman" and result.modality == "text"
    assert "encoder.self_attn" in result.layers  # its in_proj_weight has no reset_parameters: drawn anew
    with pytest.raises(SaliencyCheckFailed, match=r"NOT sensitive"):
        ps.assert_sensitive_to_layer_randomization(
            model, ids, lambda m, x, target: (x == TRIGGER).float() + 0.1 * x.float(), modality=TEXT)


def test_padding_is_left_out_of_the_comparisons() -> None:
    """compute_on_valid equals Spearman over each row's valid positions (a straightforward loop),
    with ties, rows of different lengths and a row without padding."""
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 4, (6, 1, 10), generator=g).float()  # ties
    b = torch.rand(6, 1, 10, generator=g)
    valid = torch.ones(6, 10, dtype=torch.bool)
    for row, length in enumerate([10, 7, 7, 5, 9, 6]):
        valid[row, length:] = False
    valid[4, 2] = False  # a gap, not only trailing padding
    ours = compute_on_valid("spearman", a, b, valid)
    for row in range(6):
        keep = valid[row].numpy()
        expected = scipy.stats.spearmanr(a[row, 0].numpy()[keep], b[row, 0].numpy()[keep]).statistic
        assert float(ours[row]) == pytest.approx(expected, abs=1e-6)
    # padded positions with equal values would make unrelated maps look alike: they do not count
    padded_a, padded_b = a.clone(), b.clone()
    padded_a[~valid[:, None]] = 0.0
    padded_b[~valid[:, None]] = 0.0
    torch.testing.assert_close(compute_on_valid("spearman", padded_a, padded_b, valid), ours)


def test_methods_that_need_real_valued_inputs_are_refused(trained) -> None:
    model, ids, _ = trained
    with pytest.raises(SaliencyUsageError, match=r"kernel_shap: the model's output is NaN .*baseline_token"):
        ps.explain(model, ids[:2], "kernel_shap", modality=TEXT)  # all-padding inputs pool to NaN
    for method in ("smoothgrad", "gradcam", "guided_backprop"):
        with pytest.raises(SaliencyUsageError, match=rf"{method} cannot explain token ids.*integrated_gradients"):
            ps.explain(model, ids[:2], method, modality=TEXT)
    class BagOfTokens(nn.Module):  # reads token ids through one_hot, with no nn.Embedding
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(VOCAB, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(nn.functional.one_hot(x, VOCAB).float().sum(1))

    with pytest.raises(SaliencyUsageError, match=r"BagOfTokens has no nn.Embedding.*Text\(embedding="):
        ps.explain(BagOfTokens(), ids[:2], "saliency")
    named = ps.explain(model, ids[:2], "saliency", modality=ps.Text(embedding="embedding"))
    torch.testing.assert_close(named, ps.explain(model, ids[:2], "saliency", modality=TEXT))


def test_a_hugging_face_text_classifier_with_an_attention_mask() -> None:
    """A BertForSequenceClassification built from a config (random weights, nothing downloaded):
    the attention mask is a per-input forward argument, the output's .logits the scores."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids, _ = trigger_task(8, 2)
    mask = (ids != PAD).long()
    text = ps.Text(pad_token_id=PAD, embedding="bert.embeddings.word_embeddings")
    maps = ps.explain(model, ids, "integrated_gradients", modality=text, forward_kwargs={"attention_mask": mask},
                      n_steps=4, preset="adebayo2018")
    assert maps.shape == (8, 1, LENGTH) and torch.isfinite(maps).all()
    result = ps.layer_randomization(model, ids, "saliency", modality=text, forward_kwargs={"attention_mask": mask},
                                    layers="block", depth=3)
    assert result.passed, result.failure_message()


def test_deleting_the_trigger_first_drops_the_score_fastest(trained) -> None:
    """Deletion on tokens (replaced by the baseline token): the integrated-gradients order removes
    the trigger first, so its curve falls faster than a random order's."""
    model, ids, labels = trained
    positives = ids[labels == 1]
    text = ps.Text(pad_token_id=PAD, baseline_token=UNKNOWN)
    ours = ps.deletion(model, positives, "integrated_gradients", modality=text, n_steps=8)
    shuffled = ps.deletion(model, positives, torch.rand(positives.shape, generator=torch.Generator().manual_seed(0)),
                           modality=text)
    assert ours.substrate == f"token {UNKNOWN}"
    assert ours.mean_auc < shuffled.mean_auc


def test_input_noise_refuses_token_ids(trained) -> None:
    model, ids, _ = trained
    with pytest.raises(SaliencyUsageError, match=r"token ids are integers.*hyperparameter_sweep"):
        ps.input_noise_stability(model, ids, "saliency", modality=TEXT)


def test_consistency_and_agreement_rank_tokens_not_embedding_coordinates(trained) -> None:
    """Each model has its own embedding basis: the top-k and sign metrics compare one score per
    token (the attribution summed over the embedding), so there are L features, not L x E."""
    model, ids, _ = trained
    other = TinyText()
    other.load_state_dict(model.state_dict())
    result = ps.explanation_consistency([model, other.eval()], ids, "integrated_gradients", modality=TEXT,
                                        n_splits=2, metrics=("feature_agreement",), k=3, n_steps=8)
    assert result.num_features == LENGTH
    # the same weights: the same top tokens, up to ties (the model has no position embedding, so a
    # repeated token gets one score, and ties at the k-th place count fractionally)
    assert result.value("feature_agreement") > 0.9
    agreement = ps.agreement_matrix(model, ids, ["saliency", "integrated_gradients"], ["feature_agreement"],
                                    modality=TEXT, k=3)
    assert agreement.pairs[0].values and len(agreement.pairs[0].values) == len(ids)


class Positioned(nn.Module):
    """A position embedding registered before the token embedding (both nn.Embedding)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.position = nn.Embedding(LENGTH, dim)
        self.token = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.head = nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.head((self.token(ids) + self.position(positions)).mean(1))


def test_of_several_embeddings_the_one_reading_the_token_ids_is_explained() -> None:
    torch.manual_seed(0)
    model = Positioned().eval()
    ids, _ = trigger_task(4, 3)
    auto = ps.explain(model, ids, "input_x_gradient", modality=TEXT)
    named = ps.explain(model, ids, "input_x_gradient", modality=ps.Text(pad_token_id=PAD, embedding="token"))
    torch.testing.assert_close(auto, named)


def test_a_text_whose_real_tokens_all_score_alike_is_refused_not_passed(trained) -> None:
    """Constant over the tokens that are not padding (here: a text of one token) is a constant map."""
    model, ids, _ = trained
    short = ids[:6].clone()
    short[2, 1:] = PAD
    with pytest.raises(SaliencyUsageError, match=r"constant for 1 of 6 .*over their tokens that are not padding"):
        ps.layer_randomization(model, short, "integrated_gradients", modality=TEXT, n_steps=4)


def test_padding_is_left_out_of_the_baseline_and_sweep_comparisons(trained, tmp_path) -> None:
    """A reversed ranking of the real tokens must not pass because the padding (equal in both
    maps) agrees: the baseline compares the tokens that are not padding."""
    from pytest_saliency.checks.regression import read_baseline, write_baseline

    model, ids, _ = trained
    ids = ids[:8].clone()
    ids[:, 4:] = PAD  # four real tokens and eight padding positions per text
    path = tmp_path / "b.npz"
    ps.check_baseline(model, ids, path, "saliency", modality=TEXT)
    maps, metadata = read_baseline(path)
    valid = (ids != PAD).numpy()
    reversed_maps = maps.copy()
    for row in range(8):
        real = reversed_maps[row, 0, valid[row]]
        reversed_maps[row, 0, valid[row]] = real.max() + real.min() - real  # the real tokens' order reversed
    write_baseline(path, reversed_maps, metadata)
    result = ps.check_baseline(model, ids, path, "saliency", modality=TEXT)
    assert not result.passed and result.mean < 0


def test_padding_is_left_out_of_agreement_and_consistency(trained) -> None:
    """With four real tokens and eight padding positions, equal (zero) padding would make any two
    rankings look alike; the comparisons take the real tokens only (a loop over them with scipy)."""
    model, ids, _ = trained
    ids = ids[:8].clone()
    ids[:, 4:] = PAD
    result = ps.agreement_matrix(model, ids, ["saliency", "input_x_gradient"], ["rank_correlation"], modality=TEXT)
    a = ps.explain(model, ids, "saliency", modality=TEXT).sum(-1)
    b = ps.explain(model, ids, "input_x_gradient", modality=TEXT).sum(-1)
    expected = [scipy.stats.spearmanr(a[i, :4].abs().numpy(), b[i, :4].abs().numpy()).statistic for i in range(8)]
    assert result.pairs[0].values == pytest.approx(expected, abs=1e-5)
    other = TinyText()
    other.load_state_dict(model.state_dict())
    consistency = ps.explanation_consistency([model, other.eval()], ids, "saliency", modality=TEXT, n_splits=2,
                                             metrics=("rank_correlation",))
    assert consistency.value("rank_correlation") == pytest.approx(1.0)


def test_a_baseline_the_model_cannot_score_is_a_usage_error() -> None:
    """nn.TransformerEncoder with a padding mask fails on an all-padding sequence (inside torch's
    nested tensors): the default baseline token is the pad token, so the error says which to pass."""
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, 16, padding_idx=PAD)
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
            self.head = nn.Linear(16, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embedding(ids), src_key_padding_mask=ids == PAD).mean(1))

    torch.manual_seed(0)
    model = Encoder().eval()
    ids, _ = trigger_task(4, 5)
    with pytest.raises(SaliencyUsageError, match=r"sequence of token 0 only, and the model cannot run on it.*"
                                                 r"baseline_token=<an unknown or mask"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's nested tensors are a prototype
        ps.explain(model, ids, "integrated_gradients", modality=TEXT, n_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        maps = ps.explain(model, ids, "integrated_gradients",
                          modality=ps.Text(pad_token_id=PAD, baseline_token=UNKNOWN), n_steps=4)
    assert torch.isfinite(maps).all()
