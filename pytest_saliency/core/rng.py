"""Seeded randomness that leaves every global RNG exactly as it was.

captum draws its noise from the global torch generator (NoiseTunnel, Lime, KernelShap),
from numpy's global state (GradientShap) and ``reset_parameters`` draws from the global torch
generator too. A check that seeded those globals would silently change the randomness of the
user's other tests, so every draw happens inside :func:`seeded`, which forks the torch CPU and
CUDA generators and saves/restores numpy's and Python's global states.

The model may draw too: dropout left on in eval mode (Monte Carlo dropout), noise layers, a
sampling step. Every public function that runs a model is therefore wrapped in
:func:`rng_isolated`: the global generators are saved on entry, seeded from the call's ``seed``
(so a stochastic model gives reproducible results) and restored on the way out, whatever
happens. Inside, each explanation pass starts from the same seed (:func:`pass_seeded`), so the
original model's pass and every randomized state's pass see the same random numbers, and a
comparison measures the change of the model, not a fresh dropout mask.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .torchtools import require_torch


@contextlib.contextmanager
def seeded(seed: int, device: Any = None, *, torch_only: bool = False) -> Iterator[None]:
    """Run the block with all global RNGs seeded from ``seed``, then restore them bit for bit.

    ``torch_only=True`` leaves numpy's and Python's generators alone, for blocks that only draw
    from torch (``reset_parameters``); saving and restoring those costs more than the draws.
    """
    torch = require_torch()
    seed = as_seed(seed)
    torch_seed = torch_seed_of(seed)
    devices = []
    if device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        devices = [index if index is not None else torch.cuda.current_device()]
    with contextlib.ExitStack() as stack:
        if not torch_only:
            stack.enter_context(_seeded_numpy_and_python(seed))
        stack.enter_context(torch.random.fork_rng(devices=devices, enabled=True))
        # Seed exactly the generators the fork restores. torch.random.manual_seed would also
        # (lazily) reseed every other CUDA device, a global change nothing here undoes, and it
        # records a stack trace per call even on CPU-only builds.
        torch.default_generator.manual_seed(torch_seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(torch_seed)
        yield


@contextlib.contextmanager
def _seeded_numpy_and_python(seed: int) -> Iterator[None]:
    """Install seeded numpy and Python global states for the block; the saved ones come back after."""
    import numpy as np

    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        np.random.set_state(np.random.RandomState(seed % (2**32)).get_state())
        random.setstate(random.Random(seed).getstate())
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def derive_seed(seed: int, *parts: int | str) -> int:
    """A stable sub-seed for one part of a check (one layer, one draw), independent of order.

    Python's ``hash`` varies between processes; a blake2b digest does not, so IPR and CPR
    randomize a given layer identically and pytest-xdist workers agree.
    """
    text = "\x1f".join([str(int(seed))] + [str(p) for p in parts])
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63 - 1)



# The generators are process-wide: an isolation holds this lock, so checks in several threads of
# one process run one at a time instead of saving and restoring each other's states.
_LOCK = threading.RLock()
_ISOLATION = threading.local()  # .cuda: the CUDA devices whose generators the outermost isolation saved


def _isolated() -> bool:
    return getattr(_ISOLATION, "cuda", None) is not None


def as_seed(seed: Any) -> int:
    """``seed`` as a Python int (numpy integers included), or a usage error."""
    import operator

    from ..exceptions import SaliencyUsageError

    try:
        return operator.index(seed)
    except TypeError:
        raise SaliencyUsageError(
            f"seed must be an integer (an int or a numpy integer), got {seed!r:.80}. Pass e.g. seed=0.") from None


def torch_seed_of(seed: int) -> int:
    """``seed`` within the range torch's generators accept (other ints are reduced modulo 2**64)."""
    return seed if -(2**63) <= seed < 2**64 else seed % 2**64


def _seed_all(seed: Any, cuda: list[int]) -> None:
    """Seed torch's CPU generator, the given CUDA devices' generators, numpy's and Python's global
    generators from ``seed``: the same numbers :func:`seeded` gives. Only for use inside
    :func:`isolated_rngs`, which restores them all."""
    import numpy as np

    torch = require_torch()
    seed = as_seed(seed)
    torch_seed = torch_seed_of(seed)
    torch.default_generator.manual_seed(torch_seed)
    for index in cuda:
        torch.cuda.default_generators[index].manual_seed(torch_seed)
    # Global seeding on purpose: only inside isolated_rngs, which saved these states and restores them.
    np.random.seed(seed % (2**32))
    random.seed(seed)


@contextlib.contextmanager
def isolated_rngs(seed: Any = 0) -> Iterator[None]:
    """Save every global generator, seed them all from ``seed``, run the block, restore them.

    The CUDA generators are those of devices initialized on entry (a model or inputs on a GPU
    have initialized theirs; touching another would initialize CUDA, a global change). Nested
    blocks only seed again; the outermost one restores. Blocks in other threads wait.
    """
    torch = require_torch()
    seed = as_seed(seed)
    if _isolated():
        _seed_all(seed, _ISOLATION.cuda)
        yield
        return
    import numpy as np

    with _LOCK:
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        saved = (torch.default_generator.get_state(), [torch.cuda.default_generators[i].get_state() for i in cuda],
                 np.random.get_state(), random.getstate())
        _ISOLATION.cuda = cuda
        try:
            _seed_all(seed, cuda)
            yield
        finally:
            _ISOLATION.cuda = None
            torch.default_generator.set_state(saved[0])
            for index, state in zip(cuda, saved[1]):
                torch.cuda.default_generators[index].set_state(state)
            np.random.set_state(saved[2])
            random.setstate(saved[3])


@contextlib.contextmanager
def pass_seeded(seed: Any, device: Any = None) -> Iterator[None]:
    """Seed the global generators for one explanation pass.

    Inside :func:`isolated_rngs` (every public entry point) this only seeds: the isolation
    restores the generators at the end, so forking them per pass would be wasted work. Outside,
    it is :func:`seeded`.
    """
    if _isolated():
        _seed_all(seed, _ISOLATION.cuda)
        yield
        return
    with seeded(seed, device):
        yield


def generator_states(device: Any = None) -> tuple[Any, ...]:
    """What a forward pass drawing random numbers would change: torch's CPU generator, the CUDA
    generators (inside an isolation: of every device it saved; else of ``device``), numpy's and
    Python's global states. Compare two with :func:`same_generator_states`."""
    import numpy as np

    torch = require_torch()
    if _isolated():
        indices = _ISOLATION.cuda
    elif device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        indices = [index if index is not None else torch.cuda.current_device()]
    else:
        indices = []
    cuda = [torch.cuda.default_generators[index].get_state() for index in indices]
    return torch.default_generator.get_state(), cuda, np.random.get_state(), random.getstate()


def same_generator_states(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    torch = require_torch()
    (cpu_a, cuda_a, np_a, py_a), (cpu_b, cuda_b, np_b, py_b) = a, b
    return (torch.equal(cpu_a, cpu_b) and len(cuda_a) == len(cuda_b) and all(map(torch.equal, cuda_a, cuda_b))
            and py_a == py_b and np_a[2:] == np_b[2:] and bool((np_a[1] == np_b[1]).all()))
