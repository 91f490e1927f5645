import pytest
import torch
from text_model import load_text

# The transformer is tiny (2 layers of width 32 on 128 sequences of 12 tokens): a second intra-op
# thread only adds synchronization, and on a busy machine spinning threads slow the run down.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ids(saliency_device):
    """All 128 held-out sequences: token ids (128, 12), right-padded with <pad>."""
    x, _ = load_text("test")
    return x.to(saliency_device)


@pytest.fixture(scope="session")
def labels(saliency_device):
    """Their classes (1 = the trigger word occurs)."""
    _, y = load_text("test")
    return y.to(saliency_device)
