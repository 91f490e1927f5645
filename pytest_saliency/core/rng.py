"""Seeded randomness that leaves every global RNG exactly as it was.

captum draws its noise from the global torch generator (NoiseTunnel, Lime, KernelShap),
from numpy's global state (GradientShap) and ``reset_parameters`` draws from the global torch
generator too. A check that seeded those globals would silently change the randomness of the
user's other tests, so every draw happens inside :func:`seeded`, which forks the torch CPU and
CUDA generators and saves/restores numpy's and Python's global states.

The model may draw too: dropout left on in eval mode (Monte Carlo dropout), noise layers, a
sampling step. Every public function that runs a model is therefore wrapped in
:func:`pytest_saliency.core.integrity.rng_isolated`: the global generators are saved on entry,
seeded from the call's ``seed`` (so a stochastic model gives reproducible results) and restored
on the way out, whatever happens (with the public interface below: :data:`ISOLATION_LOCK`,
:func:`isolated_devices`, :func:`save_generators`, :func:`seed_all`, :func:`restore_generators`). Inside, each explanation pass starts from the same seed (:func:`pass_seeded`), so the
original model's pass and every randomized state's pass see the same random numbers, and a
comparison measures the change of the model, not a fresh dropout mask.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .torchtools import require_torch

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None, *, torch_only: bool = False) -> Iterator[None]:
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


#: The generators are process-wide: an isolation (:func:`isolated_rngs`, or the entry-point guard of
#: :mod:`pytest_saliency.core.integrity`) holds this lock, so checks in several threads of one
#: process run one at a time instead of saving and restoring each other's states.
ISOLATION_LOCK = threading.RLock()
_ISOLATION = threading.local()  # .cuda: the CUDA devices whose generators the outermost isolation saved


def isolated_devices() -> list[int] | None:
    """The CUDA devices whose generators the outermost isolation of this thread saved (an empty
    list on the CPU), or None outside any isolation."""
    return getattr(_ISOLATION, "cuda", None)


def set_isolated_devices(devices: list[int] | None) -> None:
    """Mark this thread as inside an isolation that saved ``devices``' generators (None: outside).
    Only for an isolation that holds :data:`ISOLATION_LOCK` and restores the generators itself."""
    _ISOLATION.cuda = devices


def _isolated() -> bool:
    return isolated_devices() is not None


def initialized_cuda_devices() -> list[int]:
    """Every CUDA device when CUDA is initialized, else none: the generators an isolation saves
    (touching a device's generator would initialize CUDA, a global change)."""
    torch = require_torch()
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


#: What :func:`save_generators` returns: torch's CPU state, the CUDA states, numpy's and Python's.
GeneratorStates = tuple[Any, list[Any], Any, Any]


def save_generators(cuda: list[int]) -> GeneratorStates:
    """The states of torch's CPU generator, of the ``cuda`` devices' generators, and of numpy's and
    Python's global generators, for :func:`restore_generators`."""
    import numpy as np

    torch = require_torch()
    return (torch.default_generator.get_state(), [torch.cuda.default_generators[i].get_state() for i in cuda],
            np.random.get_state(), random.getstate())


def restore_generators(cuda: list[int], saved: GeneratorStates) -> None:
    """Put back the states :func:`save_generators` took for the same ``cuda`` devices."""
    import numpy as np

    torch = require_torch()
    torch.default_generator.set_state(saved[0])
    for index, state in zip(cuda, saved[1]):
        torch.cuda.default_generators[index].set_state(state)
    np.random.set_state(saved[2])
    random.setstate(saved[3])


def as_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as a Python int (numpy integers included, of any sign and size), or a usage error
    naming it ``name`` (:func:`pytest_saliency.core.validation.check_seed`)."""
    import operator

    from ..exceptions import SaliencyUsageError

    try:
        return operator.index(seed)
    except TypeError:
        raise SaliencyUsageError(
            f"{name} must be an integer (an int or a numpy integer, of any sign and size), got {seed!r:.80}. "
            f"Pass e.g. {name}=0.") from None


def torch_seed_of(seed: int) -> int:
    """``seed`` within the range torch's generators accept (other ints are reduced modulo 2**64)."""
    return seed if -(2**63) <= seed < 2**64 else seed % 2**64


def seed_all(seed: Any, cuda: list[int]) -> None:
    """Seed torch's CPU generator, the given CUDA devices' generators, numpy's and Python's global
    generators from ``seed``: the same numbers :func:`seeded` gives. Only for use inside an
    isolation (:func:`isolated_rngs`, the entry-point guard), which restores them all."""
    import numpy as np

    torch = require_torch()
    seed = as_seed(seed)
    torch_seed = torch_seed_of(seed)
    torch.default_generator.manual_seed(torch_seed)
    for index in cuda:
        torch.cuda.default_generators[index].manual_seed(torch_seed)
    # Global seeding on purpose: only inside an isolation, which saved these states and restores them.
    np.random.seed(seed % (2**32))
    random.seed(seed)


def seed_isolated(seed: Any) -> None:
    """Seed every generator the enclosing isolation saved (see :func:`seed_all`); an error outside one."""
    devices = isolated_devices()
    if devices is None:
        raise RuntimeError("seed_isolated is only for use inside an isolation of the global generators")
    seed_all(seed, devices)


@contextlib.contextmanager
def isolated_rngs(seed: Any = 0) -> Iterator[None]:
    """Save every global generator, seed them all from ``seed``, run the block, restore them.

    The CUDA generators are those of devices initialized on entry (a model or inputs on a GPU
    have initialized theirs; touching another would initialize CUDA, a global change). Nested
    blocks only seed again; the outermost one restores. Blocks in other threads wait.
    """
    seed = as_seed(seed)
    if _isolated():
        seed_isolated(seed)
        yield
        return
    with ISOLATION_LOCK:
        cuda = initialized_cuda_devices()
        saved = save_generators(cuda)
        set_isolated_devices(cuda)
        try:
            seed_all(seed, cuda)
            yield
        finally:
            set_isolated_devices(None)
            restore_generators(cuda, saved)


@contextlib.contextmanager
def pass_seeded(seed: Any, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed the global generators for one explanation pass.

    Inside an isolation (:func:`isolated_rngs`, or :func:`pytest_saliency.core.integrity.guarded_call`,
    which every public entry point goes through) this only seeds: the isolation restores the
    generators at the end, so forking them per pass would be wasted work. Outside, it is
    :func:`seeded`.
    """
    if _isolated():
        seed_isolated(seed)
        yield
        return
    with seeded(seed, device):
        yield


def generator_states(device: torch.device | str | None = None) -> GeneratorStates:
    """What a forward pass drawing random numbers would change: torch's CPU generator, the CUDA
    generators (inside an isolation: of every device it saved; else of ``device``), numpy's and
    Python's global states. Compare two with :func:`same_generator_states`."""
    torch = require_torch()
    indices = isolated_devices()
    if indices is None:
        indices = []
        if device is not None and torch.device(device).type == "cuda":
            index = torch.device(device).index
            indices = [index if index is not None else torch.cuda.current_device()]
    return save_generators(indices)


def same_generator_states(a: GeneratorStates, b: GeneratorStates) -> bool:
    torch = require_torch()
    (cpu_a, cuda_a, np_a, py_a), (cpu_b, cuda_b, np_b, py_b) = a, b
    return (torch.equal(cpu_a, cpu_b) and len(cuda_a) == len(cuda_b) and all(map(torch.equal, cuda_a, cuda_b))
            and py_a == py_b and np_a[2:] == np_b[2:] and bool((np_a[1] == np_b[1]).all()))
