import pytest
import torch
from tabular_model import load_tabular

# The networks are tiny (30 -> 128 -> 64 -> 16 -> 2 on 114 inputs): a second intra-op thread only
# adds synchronization, and on a busy machine spinning threads made the run several times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def inputs(saliency_device):
    """All 114 held-out inputs: (114, 30) standardized features, float32."""
    x, _ = load_tabular("test")
    return x.to(saliency_device)


@pytest.fixture(scope="session")
def labels(saliency_device):
    """Their true classes (0 = malignant, 1 = benign)."""
    _, y = load_tabular("test")
    return y.to(saliency_device)
