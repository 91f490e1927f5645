"""Quadratic Bezier curves between two trained models (mode connectivity, Garipov et al. 2018).

Ley et al. ("Consistent Explanations in the Face of Model Indeterminacy via Ensembling", Sec. 3.2)
connect two models of the same architecture, trained from different seeds, by the curve

    phi_theta(t) = (1 - t)^2 w0 + 2 t (1 - t) theta + t^2 w1,   0 <= t <= 1,

whose control point ``theta`` is trained so that the models along the curve keep a low loss.
Models sampled along it are ensembled ("connect"), or sampled and then perturbed ("combine").

:class:`BezierCurve` holds copies of the endpoints' parameters ``w0``, ``w1`` and the control
point ``theta``; it never writes to the two models it was built from:

* ``theta`` starts at ``(w0 + w1) / 2``, so the untrained curve *is* the straight line between
  the endpoints (``phi(t) = (1 - t) w0 + t w1``).
* :meth:`BezierCurve.fit` trains ``theta`` with Adam on the user's loss, each step at a ``t``
  drawn uniformly from [0, 1] by a local generator seeded from ``seed``, as Garipov et al. do. The
  loss is either that of a training loader (batches ``(x, y, ...)``, ``criterion(model(x), y)``,
  cross-entropy by default) or a function ``loss(forward) -> scalar`` that receives the model at
  ``t`` as a callable. The model runs in training mode (as it was trained; dropout masks come from
  the global generators, seeded from ``seed`` and restored afterwards).
* :meth:`BezierCurve.model_at` builds the model at ``t``: a deep copy of the first endpoint with
  the curve's parameters written into it, in eval mode.

Buffers: floating-point buffers (BatchNorm's running mean and variance) have no control point;
they are interpolated linearly, ``(1 - t) b0 + t b1``, which is not the statistics of the model
at ``t``. :func:`refresh_batchnorm` recomputes them from a loader (``connected_ensemble`` does so
whenever it is given a loader); with a loss function only, they stay interpolated. Other buffers
(``num_batches_tracked``) are the first endpoint's.

Reproducibility: the same endpoints, data, options and seed give the same curve (bit for bit on
the CPU; the model's own kernels decide on a GPU).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn

from ..core.rng import derive_seed, seeded
from ..core.validation import check_count, check_model, check_number, check_seed
from ..exceptions import SaliencyUsageError

#: A loss function of the model at t: it receives ``forward(x)`` (the model at t, differentiable in
#: the control point) and returns a scalar tensor.
LossFunction = Callable[[Callable[..., Any]], torch.Tensor]

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Both endpoints must be modules of the same class with the same parameter and buffer names,
    shapes and dtypes: a curve interpolates them entry by entry."""
    check_model(model_a)
    check_model(model_b)
    if model_a is model_b:
        raise SaliencyUsageError(
            "the two endpoints of a curve are the same model object; pass two models trained from different seeds."
        )
    if type(model_a) is not type(model_b):
        raise SaliencyUsageError(
            f"the endpoints have different architectures: {type(model_a).__name__} and {type(model_b).__name__}. "
            "A curve interpolates parameters entry by entry; pass two models of the same class and shapes."
        )
    for kind, a, b in (("parameter", dict(model_a.named_parameters()), dict(model_b.named_parameters())),
                       ("buffer", dict(model_a.named_buffers()), dict(model_b.named_buffers()))):
        if list(a) != list(b):
            only = sorted(set(a) ^ set(b))[:5]
            raise SaliencyUsageError(
                f"the endpoints have different architectures: their {kind} names differ ({only or 'order'}). "
                "Pass two models built by the same constructor with the same arguments."
            )
        for name in a:
            if a[name].shape != b[name].shape or a[name].dtype != b[name].dtype:
                raise SaliencyUsageError(
                    f"the endpoints have different architectures: {kind} {name!r} is {tuple(a[name].shape)} "
                    f"{a[name].dtype} in the first model and {tuple(b[name].shape)} {b[name].dtype} in the second. "
                    "Pass two models built by the same constructor with the same arguments."
                )
            if a[name].device != b[name].device:
                raise SaliencyUsageError(
                    f"{kind} {name!r} is on {a[name].device} in the first model and on {b[name].device} in the "
                    "second; move both models to the same device first."
                )
    tree_a = [(name, type(m).__name__) for name, m in model_a.named_modules()]
    tree_b = [(name, type(m).__name__) for name, m in model_b.named_modules()]
    if tree_a != tree_b:
        (name, kind_a), (_, kind_b) = next(((a, b) for a, b in zip(tree_a, tree_b) if a != b),
                                            ((str(len(tree_a)), "modules"), ("", f"{len(tree_b)} modules")))
        raise SaliencyUsageError(
            f"the endpoints have different architectures: module {name!r} is {kind_a} in one and {kind_b} in the "
            "other, so the models along the curve would run one endpoint's layers with the other's weights. Pass "
            "two models built by the same constructor with the same arguments.")


def bezier_weights(t: float) -> tuple[float, float, float]:
    """The weights of ``w0``, ``theta`` and ``w1`` at ``t``: ``(1-t)^2, 2t(1-t), t^2``."""
    return (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t * t


def _check_t(t: Any) -> float:
    return check_number(t, "t", low=0.0, high=1.0, hint="t is the position on the curve: 0 is the first model, 1 the second.")


class BezierCurve:
    """A quadratic Bezier curve in weight space between two models (see the module docstring)."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module) -> None:
        check_same_architecture(model_a, model_b)
        self.template = copy.deepcopy(model_a)
        with torch.no_grad():
            self.w0 = {n: p.detach().clone() for n, p in model_a.named_parameters()}
            self.w1 = {n: p.detach().clone() for n, p in model_b.named_parameters()}
            self.theta = {n: ((self.w0[n] + self.w1[n]) / 2).requires_grad_(True) for n in self.w0}
            self.b0 = {n: b.detach().clone() for n, b in model_a.named_buffers()}
            self.b1 = {n: b.detach().clone() for n, b in model_b.named_buffers()}
        self.losses: list[float] = []

    def parameters_at(self, t: float) -> dict[str, torch.Tensor]:
        """The parameters at ``t``: ``(1-t)^2 w0 + 2t(1-t) theta + t^2 w1`` (differentiable in theta).
        At t = 0 and t = 1 they are exactly the endpoints' (no arithmetic on them)."""
        if t == 0.0:
            return dict(self.w0)
        if t == 1.0:
            return dict(self.w1)
        return self.mixed(t)

    def mixed(self, t: float) -> dict[str, torch.Tensor]:
        """The Bezier formula itself at ``t``, always a function of theta (what training differentiates)."""
        a, c, b = bezier_weights(t)
        return {n: a * self.w0[n] + c * self.theta[n] + b * self.w1[n] for n in self.w0}

    def buffers_at(self, t: float) -> dict[str, torch.Tensor]:
        """Floating buffers linearly interpolated, other buffers the first endpoint's (see module docstring)."""
        if t == 1.0:
            return {n: b.clone() for n, b in self.b1.items()}
        return {n: (torch.lerp(b, self.b1[n], t) if b.is_floating_point() and t > 0.0 else b.clone())
                for n, b in self.b0.items()}

    def model_at(self, t: float) -> nn.Module:
        """A new model (a deep copy of the first endpoint) with the curve's weights at ``t``, in eval mode."""
        t = _check_t(t)
        model = copy.deepcopy(self.template)
        values = {**self.parameters_at(t), **self.buffers_at(t)}
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                tensor.copy_(values[name].detach())
        return model.eval()

    def forward_at(self, t: float) -> Callable[..., Any]:
        """The model at ``t`` as a function of its inputs, differentiable in the control point."""
        values = {**self.mixed(t), **self.buffers_at(t)}

        def forward(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(self.template, values, args, kwargs)

        return forward

    def loss_at(self, t: float, train: Iterable[Any] | LossFunction,
                criterion: Callable[..., torch.Tensor] | None = None) -> float:
        """The loss of the model at ``t``, in eval mode, without gradients: the loss function's
        value, or the mean of the loader's batch losses."""
        t = _check_t(t)
        training = self.template.training
        self.template.eval()
        try:
            with torch.no_grad():
                if not check_train(train):
                    function = cast(LossFunction, train)
                    return float(_scalar(function(self.forward_at(t)), "the loss function", need_grad=False))
                values = [float(_batch_loss(self.forward_at(t), batch, criterion, need_grad=False))
                          for batch in cast(Iterable[Any], train)]
                if not values:
                    raise SaliencyUsageError("the training loader yielded no batches; pass a non-empty loader.")
                return sum(values) / len(values)
        finally:
            self.template.train(training)

    def fit(self, train: Iterable[Any] | LossFunction, *, criterion: Callable[..., torch.Tensor] | None = None,
            epochs: int = 10, steps: int = 200, lr: float = 1e-3, seed: int = 0) -> BezierCurve:
        """Train the control point with Adam: ``epochs`` passes over a loader (one step per batch),
        or ``steps`` steps of a loss function; each step at a fresh ``t ~ U(0, 1)``. Returns self;
        ``self.losses`` holds every step's loss."""
        epochs = check_count(epochs, "epochs", hint="It is the number of passes over the training loader, e.g. 10.")
        steps = check_count(steps, "steps", hint="It is the number of Adam steps on the loss function, e.g. 200.")
        lr = check_number(lr, "lr", low=0.0, hint="It is Adam's learning rate for the control point, e.g. 1e-3.")
        seed = check_seed(seed)
        loader = check_train(train)
        draws = torch.Generator().manual_seed(derive_seed(seed, "curve t"))
        optimizer = torch.optim.Adam(list(self.theta.values()), lr=lr)
        device = next(iter(self.w0.values())).device
        training = self.template.training
        self.template.train()
        taken = 0
        try:
            with seeded(derive_seed(seed, "curve dropout"), device):
                batches = ((b for _ in range(epochs) for b in cast(Iterable[Any], train)) if loader
                           else (None for _ in range(steps)))
                for batch in batches:
                    t = float(torch.rand((), generator=draws))
                    optimizer.zero_grad(set_to_none=True)
                    forward = self.forward_at(t)
                    if loader:
                        loss = _batch_loss(forward, batch, criterion)
                    else:
                        loss = _function_loss(cast(LossFunction, train), forward)
                    loss.backward()
                    optimizer.step()
                    self.losses.append(float(loss.detach()))
                    taken += 1
        finally:
            self.template.train(training)
        if not taken:
            raise SaliencyUsageError("the training loader yielded no batches; pass a non-empty loader.")
        return self


def _is_loader(train: Any) -> bool:
    return isinstance(train, Iterable) and not isinstance(train, (str, bytes, torch.Tensor))


def check_train(train: Any) -> bool:
    """True for a loader of batches, False for a loss function; anything else is an error."""
    if _is_loader(train):
        if iter(train) is train:
            raise SaliencyUsageError(
                f"train is a one-pass iterator ({type(train).__name__}); the curve is trained for several epochs "
                "and BatchNorm statistics take one more pass. Pass a re-iterable loader (a DataLoader or a list "
                "of (x, y) batches)."
            )
        return True
    if callable(train):
        return False
    raise SaliencyUsageError(
        f"train must be a training loader (an iterable of (x, y) batches, e.g. a DataLoader or a list of "
        f"tuples) or a loss function loss(forward) -> scalar tensor, got {type(train).__name__}. The control "
        "point of the curve is trained on it."
    )


def _batch_loss(forward: Callable[..., Any], batch: Any, criterion: Callable[..., torch.Tensor] | None,
                need_grad: bool = True) -> torch.Tensor:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise SaliencyUsageError(
            f"each batch of the training loader must be a tuple (x, y, ...), got {type(batch).__name__}. "
            "Pass a loader of (inputs, labels) pairs, or a loss function instead."
        )
    out = forward(batch[0])
    if not isinstance(out, torch.Tensor):
        raise SaliencyUsageError(
            f"the model returned {type(out).__name__}, not a tensor; pass a loss function loss(forward) that "
            "selects the scores itself."
        )
    loss = (criterion or nn.functional.cross_entropy)(out, batch[1])
    return _scalar(loss, "criterion(model(x), y)", need_grad)


def _function_loss(train: LossFunction, forward: Callable[..., Any]) -> torch.Tensor:
    return _scalar(train(forward), "the loss function")


def _scalar(loss: Any, what: str, need_grad: bool = True) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or (need_grad and not loss.requires_grad):
        raise SaliencyUsageError(
            f"{what} must return a scalar tensor that depends on the model's output (so it has a gradient), got "
            f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}. Compute it from forward(x) with torch ops."
        )
    return loss.reshape(())


def refresh_batchnorm(model: nn.Module, train: Iterable[Any], seed: int = 0) -> bool:
    """Recompute the running statistics of ``model``'s BatchNorm layers as the plain average over
    one pass of the loader's inputs (training mode, no gradients), as Garipov et al. do for models on
    a curve. Writes into ``model`` (meant for the models :meth:`BezierCurve.model_at` builds) and
    returns whether it had any BatchNorm layer; leaves the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, NORMS) and m.track_running_stats]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    model.train()
    try:
        with torch.no_grad(), seeded(derive_seed(seed, "batchnorm pass"), next(model.parameters()).device):
            for batch in train:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return True


def fit_curve(model_a: nn.Module, model_b: nn.Module, train: Iterable[Any] | LossFunction, **options: Any) -> BezierCurve:
    """A :class:`BezierCurve` between the two models, its control point trained (:meth:`BezierCurve.fit`)."""
    return BezierCurve(model_a, model_b).fit(train, **options)


__all__ = ["NORMS", "BezierCurve", "LossFunction", "bezier_weights", "check_same_architecture", "check_train",
           "fit_curve", "refresh_batchnorm"]
