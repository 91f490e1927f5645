"""The session's map cache: what its key proves about a model, and what an entry holds."""

from __future__ import annotations

import copy
import sys
import threading

import pytest
import torch
from torch import nn

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import layer_randomization
import pytest_saliency.core.fingerprint as fingerprint_module
from pytest_saliency import SaliencyUsageError
from pytest_saliency.core.fingerprint import input_fingerprint, model_fingerprint, tensor_fingerprint
from pytest_saliency.maps.cache import MapCache

SCALE = 2.0


class ActNet(nn.Module):
    """A CNN whose activation is a function passed to the constructor."""

    def __init__(self, act) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 3)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv2(self.act(self.conv(x)))).flatten(1))


def act_net(act) -> ActNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ActNet(act).eval()


def make_class(act):
    """One ``__qualname__`` for every class it makes; only the closure differs."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(act(x))

    return Net


def scaled(x: torch.Tensor) -> torch.Tensor:
    return x * SCALE


def test_an_activation_function_passed_to_the_constructor_is_part_of_the_key():
    x = tiny_images(6)
    relu, sine = act_net(torch.relu), act_net(torch.sin)
    assert model_fingerprint(relu) != model_fingerprint(sine)
    assert model_fingerprint(copy.deepcopy(relu)) == model_fingerprint(relu) is not None
    cache = MapCache()
    layer_randomization(relu, x, "saliency", cache=cache)
    shared = layer_randomization(sine, x, "saliency", cache=cache)
    assert cache.hits == 0 and len(cache) == 2
    assert shared.ssim == layer_randomization(sine, x, "saliency").ssim
    layer_randomization(copy.deepcopy(relu), x, "saliency", cache=cache)  # the same function: a hit
    assert cache.hits == 1


def test_classes_from_one_factory_with_other_closures_differ():
    relu_a, relu_b, sine = make_class(torch.relu), make_class(torch.relu), make_class(torch.sin)
    assert relu_a.__qualname__ == sine.__qualname__

    def build(cls):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return cls()

    assert model_fingerprint(build(relu_a)) != model_fingerprint(build(sine))
    assert model_fingerprint(build(relu_a)) == model_fingerprint(build(relu_b)) is not None


def test_python_functions_are_keyed_by_code_defaults_closures_and_globals(monkeypatch):
    model = act_net(scaled)
    before = model_fingerprint(model)
    assert before is not None and model_fingerprint(copy.deepcopy(model)) == before
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)  # a global the function loads
    assert model_fingerprint(model) != before
    monkeypatch.undo()
    assert model_fingerprint(model) == before

    def closure(factor):
        return lambda x: x * factor

    def defaults(x, factor=2.0):
        return x * factor

    assert model_fingerprint(act_net(closure(2.0))) != model_fingerprint(act_net(closure(3.0)))
    assert model_fingerprint(act_net(closure(2.0))) == model_fingerprint(act_net(closure(2.0)))
    other = act_net(defaults)
    first = model_fingerprint(other)
    monkeypatch.setattr(defaults, "__defaults__", (3.0,))
    assert model_fingerprint(other) != first
    assert model_fingerprint(act_net(lambda x: x * 2.0)) != model_fingerprint(act_net(lambda x: x * 2.5))


def test_patched_forwards_and_hooks_change_the_key(monkeypatch):
    model = make_tiny_cnn()
    before = model_fingerprint(model)
    patched = copy.deepcopy(model)
    patched.relu1.forward = torch.sin  # an instance-level override
    assert model_fingerprint(patched) != before

    class Doubled(nn.Module):
        def forward(self, x):
            return 2 * x

    doubled = copy.deepcopy(model)
    doubled.relu1 = Doubled()
    key = model_fingerprint(doubled)
    monkeypatch.setattr(Doubled, "forward", lambda self, x: 3 * x)  # a user class's method replaced
    assert model_fingerprint(doubled) != key
    for register in (lambda: model.relu1.register_forward_hook(lambda m, i, o: o * 2),
                     lambda: model.relu1.register_forward_pre_hook(lambda m, i: (i[0] * 2,)),
                     lambda: model.conv1.register_full_backward_hook(lambda m, gi, go: gi),
                     lambda: nn.modules.module.register_module_forward_hook(lambda m, i, o: o),
                     lambda: nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: gi)):
        handle = register()
        try:
            assert model_fingerprint(model) != before
        finally:
            handle.remove()
        assert model_fingerprint(model) == before


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_a_model_whose_function_cannot_be_proven_is_never_cached():
    x = tiny_images(4)
    locked = make_tiny_cnn()
    locked.lock = threading.Lock()  # a C object: what it does is not in the walk's reach
    drawing = make_tiny_cnn()
    drawing.generator = torch.Generator()
    scripted = torch.jit.script(make_tiny_cnn())
    for model in (locked, drawing, scripted):
        assert model_fingerprint(model) is None
    cache = MapCache()
    assert cache.key(locked, x, torch.zeros(4, dtype=torch.long), "saliency", {}, 0, None) is None
    cache.put(None, torch.zeros(3))
    assert cache.get(None) is None and len(cache) == 0
    first = layer_randomization(locked, x, "saliency", cache=cache)
    second = layer_randomization(locked, x, "saliency", cache=cache)
    assert (cache.hits, len(cache)) == (0, 0) and first.ssim == second.ssim
    plain = make_tiny_cnn()  # an ordinary model next to it still shares its maps
    layer_randomization(plain, x, "saliency", cache=cache)
    layer_randomization(make_tiny_cnn(), x, "saliency", mode="cascading", cache=cache)
    assert (cache.hits, len(cache)) == (1, 1)


def test_options_are_keyed_by_content_not_by_their_repr():
    model, x = make_tiny_cnn(), tiny_images(2)
    target = torch.zeros(2, dtype=torch.long)
    a = torch.zeros(2000)
    b = a.clone()
    b[1000] = 1.0  # repr() elides the middle of a long tensor
    assert repr(a) == repr(b)
    cache = MapCache()
    key_a = cache.key(model, x, target, "integrated_gradients", {"baselines": a}, 0, None)
    assert key_a != cache.key(model, x, target, "integrated_gradients", {"baselines": b}, 0, None)
    assert key_a == cache.key(model, x, target, "integrated_gradients", {"baselines": a.clone()}, 0, None)


def test_a_view_is_stored_as_a_compact_copy_and_bytes_counts_what_is_held():
    stack = torch.rand(9, 100, 100)  # say every state's maps, of which the cache gets column 0
    view = stack[0]
    cache = MapCache()
    cache.put("k", view)
    stored = cache.get("k")
    assert torch.equal(stored, view)
    assert stored.untyped_storage().nbytes() == view.numel() * view.element_size() == cache.bytes == 40_000
    cache.put("k", stack[1:3])  # replaced: the old entry's bytes are released
    assert cache.bytes == 80_000 and cache.get("k").untyped_storage().nbytes() == 80_000
    compact = torch.rand(10)
    cache.put("c", compact)  # already compact: kept without a copy
    assert cache.get("c").data_ptr() == compact.data_ptr() and cache.bytes == 80_040


def test_an_occlusion_check_caches_its_original_maps_without_the_state_stack():
    model, x = make_tiny_cnn(), tiny_images(3)
    cache = MapCache()
    result = layer_randomization(model, x, "occlusion", window=4, stride=2, cache=cache)
    assert result.reused_activations and len(cache) == 1
    stored = cache.get(next(iter(cache._entries)))
    assert stored.untyped_storage().nbytes() == stored.numel() * stored.element_size() == cache.bytes


@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 16 * 16, 3)),
    make_tiny_cnn,
])
def test_ordinary_models_share_maps_and_a_global_hook_stops_it(build):
    x, cache = tiny_images(4), MapCache()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        first, second = build().eval(), build().eval()
    second.load_state_dict(first.state_dict())
    layer_randomization(first, x, "saliency", target=0, cache=cache)
    layer_randomization(second, x, "saliency", target=0, mode="cascading", cache=cache)
    assert cache.hits == 1
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o * 1.5 if isinstance(m, nn.ReLU) else o)
    try:  # (the same targets: only the hook tells the keys apart)
        layer_randomization(second, x, "saliency", target=0, cache=cache)
    finally:
        handle.remove()
    assert cache.hits == 1 and len(cache) == 2


def _linear(weight: list[float], dtype: torch.dtype = torch.float32) -> nn.Module:
    layer = nn.Linear(len(weight), 1, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight], dtype=dtype))
    return layer


@pytest.mark.parametrize(
    "first, second",
    [
        ([1e20, 1.0, -1e20], [1e20, 1000.0, -1e20]),  # a large value absorbs a small one in a float sum
        ([float("-inf"), 0.0, 0.0], [0.0, float("-inf"), 0.0]),  # where an infinity sits
        ([float("nan"), 1.0, 2.0], [1.0, float("nan"), 2.0]),
        ([0.0, 1.0, 2.0], [-0.0, 1.0, 2.0]),
    ],
    ids=["absorbed", "inf-position", "nan-position", "signed-zero"],
)
def test_models_whose_values_differ_never_share_a_key(first: list[float], second: list[float]) -> None:
    assert model_fingerprint(_linear(first)) != model_fingerprint(_linear(second))
    assert model_fingerprint(_linear(first)) == model_fingerprint(_linear(list(first)))


def test_masks_with_infinities_in_other_places_do_not_share_maps() -> None:
    class Masked(nn.Module):
        def __init__(self, mask: torch.Tensor) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.register_buffer("mask", mask)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.softmax(x + self.mask, dim=1))

    causal = torch.full((4, 4), float("-inf")).triu(1)[0]
    other = torch.full((4, 4), float("-inf")).tril(-1)[-1]
    a, b = Masked(causal), Masked(other)
    b.load_state_dict({**a.state_dict(), "mask": other})
    assert model_fingerprint(a) != model_fingerprint(b)


def test_complex_parameters_differing_in_their_imaginary_part_do_not_share_a_key() -> None:
    class Complex(nn.Module):
        def __init__(self, value: complex) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([value, 1 + 0j]))

    assert model_fingerprint(Complex(1 + 1j)) != model_fingerprint(Complex(1 + 2j))


def test_the_content_checksum_is_exact_across_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    whole = tensor_fingerprint([("x", values)])
    monkeypatch.setattr(fingerprint_module, "_CHECKSUM_STEP", 7)
    assert tensor_fingerprint([("x", values)]) == whole
    swapped = values.clone()
    swapped[[3, 900]] = swapped[[900, 3]]
    assert tensor_fingerprint([("x", swapped)]) != whole


@pytest.mark.parametrize("bad", ["a", float("nan"), -1, 1.5, True])
def test_the_cache_size_is_validated(bad: object) -> None:
    with pytest.raises(SaliencyUsageError, match="max_bytes"):
        MapCache(bad)  # type: ignore[arg-type]


def test_the_input_fingerprint_is_a_sha256_of_the_float32_values_and_the_shape() -> None:
    """Stored baselines match their inputs by this hash: the same values give the same hash
    whatever the dtype they are held in, another shape or value another hash."""
    x = torch.rand(2, 3, generator=torch.Generator().manual_seed(0))
    assert len(input_fingerprint(x)) == 64 and input_fingerprint(x) == input_fingerprint(x.double())
    assert input_fingerprint(x.reshape(3, 2)) != input_fingerprint(x)
    assert input_fingerprint(x + 1e-3) != input_fingerprint(x)



def test_the_array_digest_covers_dtype_shape_and_bytes_for_every_dtype_and_layout() -> None:
    """A stored baseline's tensor options are told apart by this digest (via ``jsonable(tensors="digest")``):
    bfloat16 and other dtypes numpy lacks work, strided views and expanded tensors give the digest of
    their values, and equal bytes of another dtype give another digest."""
    from pytest_saliency.core.fingerprint import array_digest
    from pytest_saliency.core.jsonable import jsonable

    assert array_digest(torch.zeros(2, 3)) != array_digest(torch.zeros(2, 3, dtype=torch.int32))
    assert array_digest(torch.zeros(2, 3)) != array_digest(torch.zeros(3, 2))
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    assert array_digest(x.t()) == array_digest(x.t().contiguous()) != array_digest(x)
    assert array_digest(x[:, ::2]) == array_digest(x[:, ::2].contiguous())
    shared = torch.full((1, 1, 1, 1), 0.25).expand(1, 1, 16, 16)
    assert array_digest(shared) == array_digest(torch.full((1, 1, 16, 16), 0.25))
    assert array_digest(x.numpy().T) == array_digest(x.numpy().T.copy())
    half = torch.full((1, 1, 4, 4), 0.25, dtype=torch.bfloat16)
    assert len(array_digest(half)) == 64 and array_digest(half) != array_digest(half.float())
    assert array_digest(torch.zeros(())) != array_digest(torch.zeros(1))
    assert array_digest(torch.tensor([1 + 2j]).conj()) == array_digest(torch.tensor([1 - 2j]))

    options = jsonable({"baselines": half, "other": x.t()}, tensors="digest")
    assert options["baselines"].startswith("tensor(1, 1, 4, 4) bfloat16 sha256:")
    assert options["other"] == jsonable({"other": x.t().contiguous()}, tensors="digest")["other"]
    zeros = jsonable([torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int32)], tensors="digest")
    assert zeros[0] != zeros[1] and zeros[0].split()[-1] != zeros[1].split()[-1]


def test_an_lru_cache_wrapper_is_fingerprinted_by_the_function_it_wraps():
    import functools

    def make(scale):
        @functools.lru_cache(maxsize=None)
        def scaled(x: int) -> int:
            return x * scale
        return scaled

    double, double_again, triple = make(2), make(2), make(3)
    assert fingerprint_module.value_fingerprint(double) is not None
    before = fingerprint_module.value_fingerprint(double)
    double(5)  # a stored result does not change what the function computes
    assert fingerprint_module.value_fingerprint(double) == before == fingerprint_module.value_fingerprint(double_again)
    assert fingerprint_module.value_fingerprint(triple) != before
