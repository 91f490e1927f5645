"""How a check calls the user's model: the extra arguments its forward takes, and which part of
its output holds the class scores.

Models as people write them return a tensor of scores, a tuple, a dict, or a Hugging Face
``ModelOutput``, and take extra arguments (an attention mask, a flag). Every entry point accepts

- ``output=``: which part of the output holds the (N, num_classes) scores: a key or attribute
  name (``"logits"``), an index into a tuple, or a callable ``output(out) -> tensor``. The default
  takes a tensor as it is and the ``.logits`` of anything that has one, and otherwise raises an
  error naming the output's type and this option. A name or an index leaves a tensor output as it
  is (the same option then serves an :class:`~pytest_saliency.checks.ensembles.Ensemble` of such
  models);
- ``forward_kwargs=``: keyword arguments for every forward call. A tensor whose first dimension
  equals the number of inputs is one row per input (an attention mask): each forward gets the
  rows of the inputs it runs on, also inside captum's expanded batches (passed to captum as
  ``additional_forward_args``, which captum expands with the inputs). Anything else is passed
  to every call unchanged.

An entry point decorated with :func:`passes_model_call` makes its options the ambient
:class:`ModelCall` for everything it runs; the library's own forward passes go through
:func:`call_model`, and captum gets :func:`captum_forward`'s module. Nested entry points that
leave both options unset run under the outer call's options.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, Union

from ..exceptions import SaliencyUsageError
from .stream import is_stream
from .torchtools import require_torch

if TYPE_CHECKING:
    import torch

F = TypeVar("F", bound=Callable[..., Any])

#: What ``output=`` accepts: None (the default rule), a key or attribute name, a tuple index, or a callable.
OutputSelector = Union[None, str, int, Callable[[Any], Any]]

OUTPUT_HINT = (
    "Pass output= naming the scores: output='logits' (a key or attribute), output=0 (a tuple index), "
    "or output=lambda out: out['scores']."
)


@dataclasses.dataclass(frozen=True)
class ModelCall:
    """The options every forward pass of one check uses (see the module docstring)."""

    output: OutputSelector = None
    static: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    per_example: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    n_inputs: int = 0
    modality: str | None = None  # what the inputs are (see MODALITIES); None outside every entry point
    text: Text | None = None  # how token inputs are explained (the text modality)
    tabular: Tabular | None = None  # the features' names (the tabular modality)
    valid: Any = None  # token inputs: which positions of the check's inputs are not padding (N, L)
    modality_given: bool = False  # named by the user (modality=...), not inferred from the inputs
    n_features: int = 0  # feature vectors: the inputs' columns (D), before Tabular(groups=...) sums any

    @property
    def default(self) -> bool:
        return self.output is None and not self.static and not self.per_example

    def kwargs_for(self, rows: Any, batch: int) -> dict[str, Any]:
        """The forward keyword arguments for a batch of ``batch`` inputs at ``rows`` of the check's
        inputs (``None``: the batch is the check's inputs, in order)."""
        if not self.per_example:
            return dict(self.static)
        index = _row_index(self, rows, batch)
        return {**self.static, **{name: value[index] for name, value in self.per_example.items()}}


_CALL: contextvars.ContextVar[ModelCall] = contextvars.ContextVar("pytest_saliency_model_call", default=ModelCall())


def current_call() -> ModelCall:
    """The ambient :class:`ModelCall` (the default one outside every entry point)."""
    return _CALL.get()


def _row_index(call: ModelCall, rows: Any, batch: int) -> Any:
    torch = require_torch()
    names = ", ".join(repr(n) for n in call.per_example)
    if rows is None:
        if batch != call.n_inputs:
            raise SaliencyUsageError(
                f"forward_kwargs {names} have one row per input ({call.n_inputs} inputs), but this step of the "
                f"check runs the model on {batch} examples that are not those inputs, so it cannot tell which "
                "rows belong to them. Pass the per-input arguments for the inputs this check is given, or run "
                "this check without per-input forward arguments."
            )
        return slice(None)
    device = next(iter(call.per_example.values())).device
    index = torch.as_tensor(rows, dtype=torch.long, device=device).reshape(-1)
    if index.numel() == batch:
        return index
    if index.numel() == 1:
        return index.expand(batch)
    raise SaliencyUsageError(
        f"forward_kwargs {names} have one row per input, but the model was run on {batch} examples made from "
        f"{index.numel()} inputs (a custom explainer that expands its batch, as integrated gradients or noise "
        "samples do), so the rows cannot follow them. In a custom explainer, explain one input at a time, or pass "
        "model.additional_forward_args to captum as additional_forward_args (captum expands them with the inputs)."
    )


def _check_selector(output: Any) -> OutputSelector:
    if output is None or isinstance(output, str) or callable(output):
        return output
    if isinstance(output, int) and not isinstance(output, bool):
        return output
    raise SaliencyUsageError(
        f"output={output!r} ({type(output).__name__}) is not a way to select the scores. {OUTPUT_HINT}"
    )


@dataclasses.dataclass(frozen=True)
class static:  # noqa: N801 - used like a function: forward_kwargs={"prior": static(prior)}
    """A forward argument passed to every call as it is, even a tensor whose first dimension happens
    to equal the number of inputs (which would otherwise be split into one row per input)."""

    value: Any


def _split_kwargs(forward_kwargs: Any, n_inputs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(static, per_example)``: per-example are tensors whose first dimension is the input count,
    unless wrapped in :class:`static`."""
    torch = require_torch()
    if forward_kwargs is None:
        return {}, {}
    if not isinstance(forward_kwargs, Mapping) or not all(isinstance(k, str) for k in forward_kwargs):
        raise SaliencyUsageError(
            f"forward_kwargs must be a dict of keyword arguments for the model's forward, got "
            f"{type(forward_kwargs).__name__}. Pass e.g. forward_kwargs={{'attention_mask': mask}}."
        )
    fixed: dict[str, Any] = {}
    per_example: dict[str, Any] = {}
    for name, value in forward_kwargs.items():
        if isinstance(value, static):
            fixed[name] = value.value
            continue
        rows = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n_inputs
        (per_example if rows else fixed)[name] = value
    return fixed, per_example


#: What a check's inputs can be: images (N, C, H, W), feature vectors (N, D), series (N, C, T) and
#: token ids (N, L). The maps of the last three are one-dimensional.
MODALITIES = ("image", "tabular", "sequence", "text")


@dataclasses.dataclass(frozen=True)
class Text:
    """``modality=Text(...)``: token-id inputs (N, L), explained at their embedding.

    Attributes:
        pad_token_id: the padding token; its positions are left out of every comparison.
        embedding: the name of the embedding module (``model.named_modules()``); ``None`` takes
            the first ``nn.Embedding`` registered in the model (a Hugging Face model's word
            embeddings).
        baseline_token: the token whose embedding is the baseline of integrated gradients and
            DeepLIFT and replaces tokens in occlusion and ablation; ``None`` is ``pad_token_id``
            (0 when there is none). A mask token (``[MASK]``) is the other common choice.
    """

    pad_token_id: int | None = None
    embedding: str | None = None
    baseline_token: int | None = None
    vocabulary: Sequence[str] | None = None  # token id -> its text, for the report's token maps

    def __post_init__(self) -> None:
        for name in ("pad_token_id", "baseline_token"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise SaliencyUsageError(f"Text({name}=...) must be a token id (an int >= 0) or None, got {value!r}.")
        if self.embedding is not None and not isinstance(self.embedding, str):
            raise SaliencyUsageError(
                f"Text(embedding=...) must name the embedding module (a str from model.named_modules()), got "
                f"{type(self.embedding).__name__}."
            )

    def token(self, token_id: int) -> str | None:
        """A token's text for the report (None for padding, which is not drawn)."""
        if token_id == self.pad_token_id:
            return None
        vocabulary = self.vocabulary
        return str(vocabulary[token_id]) if vocabulary is not None and 0 <= token_id < len(vocabulary) else str(token_id)

    @property
    def baseline(self) -> int:
        """The baseline token id (see the class docstring)."""
        if self.baseline_token is not None:
            return self.baseline_token
        return self.pad_token_id if self.pad_token_id is not None else 0


@dataclasses.dataclass(frozen=True)
class Tabular:
    """``modality=Tabular(feature_names=[...], groups={...})``: feature vectors (N, D) whose
    features have names, shown in the report's tables and bar charts.

    ``groups`` maps a name to the columns of one categorical feature's one-hot encoding, e.g.
    ``{"colour": [4, 5, 6]}``. Its columns' signed attributions are summed into one position of
    the maps (the feature's attribution, as additive attributions such as SHAP group them), which
    takes the group's place at its first column; every check then ranks and compares the
    categorical feature once, not each of its indicator columns.
    """

    feature_names: Sequence[str] | None = None
    groups: Mapping[str, Sequence[int]] | None = None

    def __post_init__(self) -> None:
        names = self.feature_names
        if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
            raise SaliencyUsageError(
                "Tabular(feature_names=...) must be a list of str, one per feature (e.g. "
                "sklearn's load_breast_cancer().feature_names.tolist())."
            )
        if self.groups is not None:
            _check_groups(self.groups)

    def positions(self, n_features: int) -> list[tuple[str, list[int]]]:
        """The maps' positions: each a name and the input columns summed into it, in column order."""
        names = list(self.feature_names) if self.feature_names is not None else [f"x{j}" for j in range(n_features)]
        group_of = {j: name for name, columns in (self.groups or {}).items() for j in columns}
        out: list[tuple[str, list[int]]] = []
        for j in range(n_features):
            if j not in group_of:
                out.append((names[j], [j]))
            elif j == min((self.groups or {})[group_of[j]]):
                out.append((group_of[j], sorted((self.groups or {})[group_of[j]])))
        return out

    def grouped(self, values: torch.Tensor) -> torch.Tensor:
        """Per-column values (..., D) summed into the maps' positions (..., D'): the columns of
        each group added, the others as they are."""
        if not self.groups:
            return values
        torch = require_torch()
        positions = self.positions(int(values.shape[-1]))
        sums = torch.zeros(int(values.shape[-1]), len(positions), dtype=values.dtype, device=values.device)
        for index, (_, columns) in enumerate(positions):
            sums[columns, index] = 1
        return values @ sums


def _check_groups(groups: Any) -> None:
    ok = isinstance(groups, Mapping) and all(
        isinstance(name, str) and isinstance(columns, Sequence) and not isinstance(columns, str) and len(columns) > 0
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in columns)
        for name, columns in groups.items())
    if not ok:
        raise SaliencyUsageError(
            f"Tabular(groups=...) must map a name to the column indices of one categorical feature's one-hot "
            f"encoding, e.g. groups={{'colour': [4, 5, 6]}}, got {groups!r:.120}.")
    seen: dict[int, str] = {}
    for name, columns in groups.items():
        for column in columns:
            if column in seen:
                raise SaliencyUsageError(
                    f"Tabular(groups=...): column {column} is in both {seen[column]!r} and {name!r}; a column "
                    "belongs to one categorical feature.")
            seen[column] = name


def infer_modality(inputs: Any) -> str | None:
    """The modality the shape and dtype of ``inputs`` say (None for a shape none has)."""
    dim = len(getattr(inputs, "shape", ()))
    if dim == 4:
        return "image"
    if dim == 3:
        return "sequence"
    if dim == 2:
        floating = getattr(inputs, "is_floating_point", None)
        return "tabular" if floating is None or floating() else "text"
    return None


def _check_modality(modality: Any, inputs: Any) -> str | None:
    if isinstance(modality, Text):
        return "text"
    if isinstance(modality, Tabular):
        if modality.feature_names is not None and len(getattr(inputs, "shape", ())) == 2 \
                and len(modality.feature_names) != inputs.shape[1]:
            raise SaliencyUsageError(
                f"Tabular(feature_names=...) names {len(modality.feature_names)} features, but the inputs have "
                f"{inputs.shape[1]}: pass one name per column."
            )
        columns = max((c for cs in (modality.groups or {}).values() for c in cs), default=-1)
        if len(getattr(inputs, "shape", ())) == 2 and columns >= inputs.shape[1]:
            raise SaliencyUsageError(
                f"Tabular(groups=...) names column {columns}, but the inputs have {inputs.shape[1]} columns "
                f"(0 to {inputs.shape[1] - 1}).")
        return "tabular"
    if modality is None:
        return infer_modality(inputs)
    if not (isinstance(modality, str) and modality in MODALITIES):
        raise SaliencyUsageError(
            f"unknown modality {modality!r}. Valid modalities: {', '.join(MODALITIES)} (or leave modality=None to "
            "infer it: (N, C, H, W) image, (N, D) tabular, (N, C, T) sequence, integer (N, L) text)."
        )
    return modality


@contextlib.contextmanager
def model_call_options(output: Any = None, forward_kwargs: Any = None, inputs: Any = None,
                       modality: Any = None) -> Iterator[ModelCall]:
    """Make ``output``, ``forward_kwargs`` and the inputs' ``modality`` (inferred from ``inputs``
    unless given) the ambient options for the forward passes inside.

    With all three unset, an enclosing entry point's options stay in force.
    """
    outer = _CALL.get()
    if output is None and forward_kwargs is None and modality is None and outer.modality is not None:
        yield outer
        return
    n_inputs = int(inputs.shape[0]) if hasattr(inputs, "shape") and len(inputs.shape) else 0
    static, per_example = _split_kwargs(forward_kwargs, n_inputs)
    name = _check_modality(modality, inputs)
    text = modality if isinstance(modality, Text) else (Text() if name == "text" else None)
    tabular = modality if isinstance(modality, Tabular) else None
    valid = None
    if text is not None and text.pad_token_id is not None and hasattr(inputs, "shape") and len(inputs.shape) == 2:
        valid = inputs != text.pad_token_id
    n_features = int(inputs.shape[-1]) if name == "tabular" and len(getattr(inputs, "shape", ())) == 2 else 0
    call = ModelCall(_check_selector(output), static, per_example, n_inputs, name, text, tabular, valid,
                     modality is not None, n_features)
    token = _CALL.set(call)
    try:
        yield call
    finally:
        _CALL.reset(token)


def passes_model_call(function: F) -> F:
    """Run an entry point with its ``output=`` and ``forward_kwargs=`` (parameters of its own, or
    options it passes on through ``**kwargs``) as the ambient :class:`ModelCall`, for the
    examples of its ``inputs`` argument."""
    signature = inspect.signature(function)
    if "inputs" not in signature.parameters:
        raise TypeError(f"{function.__qualname__} has no inputs parameter")
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        bound = signature.bind_partial(*args, **kwargs).arguments
        passed = {**bound.get(var_keyword, {}), **bound} if var_keyword else bound
        if is_stream(passed.get("inputs")):  # the streaming entry point it calls sets the options per batch
            return function(*args, **kwargs)
        options = (passed.get(name) for name in ("output", "forward_kwargs", "inputs", "modality"))
        with model_call_options(*options):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _describe(out: Any) -> str:
    torch = require_torch()
    if isinstance(out, Mapping):
        parts = [f"{k!r}: {_short(v, torch)}" for k, v in out.items()]
        return f"{type(out).__name__} with keys {{{', '.join(parts)}}}"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__} of {len(out)} ({', '.join(_short(v, torch) for v in out)})"
    return type(out).__name__


def _short(value: Any, torch: Any) -> str:
    return f"tensor {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def select_scores(out: Any, output: OutputSelector = None) -> torch.Tensor:
    """The scores tensor in a model's output ``out`` by the ``output=`` rule (module docstring)."""
    torch = require_torch()
    if output is None:
        if isinstance(out, torch.Tensor):
            return out
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
        raise SaliencyUsageError(
            f"the model returns a {_describe(out)}, not a tensor of scores, and has no .logits. {OUTPUT_HINT}"
        )
    if isinstance(out, torch.Tensor) and not callable(output):
        return out  # already the scores (an Ensemble of such models, a wrapper that selected them)
    selected = _selected(out, output)
    if not isinstance(selected, torch.Tensor):
        raise SaliencyUsageError(
            f"output={_name(output)} selected a {type(selected).__name__} from the model's {_describe(out)}; "
            f"it must select a tensor of scores. {OUTPUT_HINT}"
        )
    return selected


def _name(output: OutputSelector) -> str:
    return getattr(output, "__name__", repr(output)) if callable(output) else repr(output)


def _selected(out: Any, output: OutputSelector) -> Any:
    try:
        if callable(output):
            return output(out)
        if isinstance(output, int):
            return out[output]
        if isinstance(out, Mapping):
            return out[output]
        return getattr(out, str(output))
    except (KeyError, IndexError, AttributeError, TypeError) as error:
        raise SaliencyUsageError(
            f"output={_name(output)} cannot select the scores from the model's {_describe(out)} "
            f"({type(error).__name__}: {error}). {OUTPUT_HINT}"
        ) from None


def call_model(model: Any, inputs: torch.Tensor, rows: Any = None) -> torch.Tensor:
    """``model(inputs, **forward_kwargs)``'s scores under the ambient :class:`ModelCall`.

    ``rows``: where ``inputs`` sit in the check's inputs (an index per input, or one index for a
    batch that repeats one input); ``None`` when ``inputs`` are the check's inputs in order.
    """
    call = _CALL.get()
    model, rows = _unwrapped(model, rows)
    out = model(inputs, **call.kwargs_for(rows, inputs.shape[0]))
    # an Ensemble selects its members' scores itself
    return out if getattr(model, "selects_scores", False) else select_scores(out, call.output)


def _unwrapped(model: Any, rows: Any) -> tuple[Any, Any]:
    """The user's model and the rows in the check's inputs, for a :class:`ScoresModule` handed to
    a custom explainer that explains its chunk again (``rows`` are then places in that chunk)."""
    if not isinstance(model, ScoresModule):
        return model, rows
    outer = model.rows
    if outer is None or rows is None:
        return model.model, outer if rows is None else rows
    index = list(range(len(outer)))[rows] if isinstance(rows, slice) else rows
    return model.model, [outer[int(i)] for i in require_torch().as_tensor(index).reshape(-1).tolist()]


def captum_forward(model: Any, rows: Any, batch: int) -> tuple[Any, tuple[Any, ...] | None]:
    """``(forward, additional_forward_args)`` for a captum method explaining ``batch`` inputs at
    ``rows`` of the check's inputs: a module that returns the selected scores and takes the
    per-input forward arguments positionally (captum expands ``additional_forward_args`` with the
    inputs: IG's steps, SmoothGrad's samples, occlusion's perturbations)."""
    call = _CALL.get()
    model, rows = _unwrapped(model, rows)
    if not call.per_example:
        return ScoresModule(model, call), None
    names = tuple(call.per_example)
    index = _row_index(call, rows, batch)
    return ScoresModule(model, call, names), tuple(call.per_example[name][index] for name in names)


def _module_base() -> type:
    return require_torch().nn.Module


class ScoresModule(_module_base()):  # type: ignore[misc]
    """The user's model (a child, so captum's module hooks reach its layers) returning the scores
    selected by a :class:`ModelCall`. With ``names``, the per-input forward arguments come
    positionally after the inputs (captum's ``additional_forward_args``); without, they are the
    rows ``rows`` of the check's inputs (see :func:`call_model`)."""

    def __init__(self, model: Any, call: ModelCall, names: Sequence[str] = (), rows: Any = None) -> None:
        super().__init__()
        self.model = model
        self.call = call
        self.names = tuple(names)
        self.rows = rows

    def forward(self, inputs: Any, *per_example: Any) -> Any:
        names = self.names or tuple(self.call.per_example)
        if per_example:
            kwargs = {**self.call.static, **dict(zip(names, per_example))}
        else:
            kwargs = self.call.kwargs_for(self.rows, inputs.shape[0])
        out = self.model(inputs, **kwargs)
        return out if getattr(self.model, "selects_scores", False) else select_scores(out, self.call.output)

    @property
    def additional_forward_args(self) -> tuple[Any, ...] | None:
        """The per-input forward arguments of this module's inputs, for a custom explainer to pass
        to captum as ``additional_forward_args`` (captum expands them with its batches)."""
        if not self.call.per_example:
            return None
        index = _row_index(self.call, self.rows, len(self.rows) if self.rows is not None else self.call.n_inputs)
        return tuple(value[index] for value in self.call.per_example.values())

    def __getattr__(self, name: str) -> Any:
        """The user's model's attributes (``wrapper.features[3]`` for a custom explainer's layer)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


__all__ = [
    "MODALITIES", "OUTPUT_HINT", "ModelCall", "OutputSelector", "ScoresModule", "Tabular", "Text", "call_model",
    "captum_forward", "current_call", "infer_modality", "model_call_options", "passes_model_call", "select_scores",
    "static",
]
