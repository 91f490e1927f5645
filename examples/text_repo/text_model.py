"""A small text model repo: a transformer classifier on a trigger-token task, generated in code.

The data (nothing is downloaded): sequences of 6 to 12 words over a vocabulary of 24 token strings
(``VOCAB``), right-padded to 12 with ``<pad>`` (id 0); id 1 is ``<unk>``, the unknown/mask token
that integrated gradients starts from. Half of the sequences contain the trigger word
``"excellent"`` (id 2) once, at a random position; the label is whether it occurs
(1 = "positive", 0 = "neutral"). The other words are drawn uniformly from the rest of the
vocabulary, and about one word in ten is replaced by ``<unk>`` (out-of-vocabulary words), so the
model learns that ``<unk>`` is neutral and an all-``<unk>`` baseline is classified "neutral".
The trigger is the only token that decides the label: the ground truth that the maps must find.

* a fixed, seeded split: 768 train / 128 test sequences, int64 token ids (N, 12);
* ``train(seed)``: ``TextClassifier`` initialized from ``seed`` and trained with Adam over the
  training split in a fixed order (a couple of seconds on one CPU thread). It is a factory for
  ``saliency.assert_seed_consistency_above(train, ids, seeds=...)``; ``train.build`` lets the
  plugin's model cache rebuild the architecture to load stored weights into.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

PAD, UNKNOWN, TRIGGER = 0, 1, 2
VOCAB = [
    "<pad>", "<unk>", "excellent",
    "the", "a", "movie", "film", "plot", "actor", "scene", "was", "is",
    "very", "quite", "long", "short", "story", "music", "and", "but",
    "ending", "camera", "script", "cast",
]
LENGTH = 12  # padded length
MIN_LENGTH = 6
N_TRAIN, N_TEST = 768, 128
DATA_SEED = 0
UNKNOWN_RATE = 0.1
EPOCHS = 8
BATCH = 64
LR = 3e-3
DIM, HEADS, FFN, LAYERS = 32, 4, 64, 2


class TextClassifier(nn.Module):
    """Token embedding (padding_idx), two transformer encoder layers that ignore padding
    (src_key_padding_mask), masked mean pooling over the real tokens and a linear head."""

    def __init__(self, vocab_size: int = len(VOCAB), dim: int = DIM, classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, HEADS, FFN, dropout=0.0, batch_first=True),
            num_layers=LAYERS, enable_nested_tensor=False,
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        padding = ids == PAD
        hidden = self.encoder(self.embedding(ids), src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).float()
        return self.head((hidden * keep).sum(1) / keep.sum(1).clamp(min=1))


def _generate(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(TRIGGER + 1, len(VOCAB), (n, LENGTH), generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    lengths = torch.randint(MIN_LENGTH, LENGTH + 1, (n,), generator=generator)
    positions = (torch.rand(n, generator=generator) * lengths).long()
    # Out-of-vocabulary words: about 1 word in 10 is <unk>, so the model sees the baseline token in
    # training and learns that it is neutral (an all-<unk> sequence is then "neutral", as the
    # integrated-gradients baseline should be).
    ids[torch.rand(n, LENGTH, generator=generator) < UNKNOWN_RATE] = UNKNOWN
    for i in range(n):
        if labels[i]:
            ids[i, int(positions[i])] = TRIGGER
        ids[i, int(lengths[i]):] = PAD
    return ids, labels


@lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    ids, labels = _generate(N_TRAIN + N_TEST, torch.Generator().manual_seed(DATA_SEED))
    return {"train": (ids[:N_TRAIN], labels[:N_TRAIN]), "test": (ids[N_TRAIN:], labels[N_TRAIN:])}


def load_text(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, 12), right-padded with PAD, and labels (1 = the trigger occurs)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    ids, labels = _splits()[split]
    return ids.clone(), labels.clone()


def decode(ids: torch.Tensor) -> str:
    """One sequence as words, padding left out."""
    return " ".join(VOCAB[int(t)] for t in ids if int(t) != PAD)


def train(seed: int = 0, epochs: int = EPOCHS) -> TextClassifier:
    """Train from scratch: only the initialization depends on ``seed`` (the data order is fixed).
    Touches no global RNG state (everything runs under fork_rng)."""
    ids, labels = load_text("train")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TextClassifier()
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        model.train()
        for _ in range(epochs):
            for xb, yb in zip(ids.split(BATCH), labels.split(BATCH)):
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                optimizer.step()
    return model.eval()


train.build = TextClassifier  # the model cache rebuilds the architecture with this to load weights


def accuracy(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).argmax(1) == labels).float().mean())
