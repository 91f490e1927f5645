"""Whatever ends a check (a return, an error, a real Ctrl-C), the model, torch's modes and the
global generators come back bit-identical; state the model writes in its own forward pass is put
back and reported."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_tiny_cnn, tiny_images
from pytest_saliency import (
    SaliencyCheckFailed, SaliencyWarning, accuracy_spread, agreement_matrix, assert_sensitive_to_layer_randomization, check_baseline, explain, explanation_consistency, hyperparameter_sweep,
    layer_randomization,
)

ROOT = Path(__file__).resolve().parent.parent

# A child process: checks in a loop on a small CNN, SIGINT sent by os.kill at seeded random moments
# (a timer thread), and after each interrupt every piece of state compared with the state before.
# Then real signals at chosen moments where a restore starts (see below).
CHILD = r'''
import json, os, random, signal, sys, threading, time

import numpy as np
import torch
from torch import nn

import pytest_saliency as ps
from pytest_saliency.model import randomize as randomization

torch.set_num_threads(1)
INTERRUPTS, SEED, BUDGET = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.convs = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(6)])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(self.relu(self.convs(self.bn(self.conv1(x)))).flatten(1))


torch.manual_seed(0)
model = Net()
with torch.no_grad():
    model.bn.running_mean.uniform_(-0.1, 0.1)
    model.bn.running_var.uniform_(0.5, 1.5)
model.eval()
model.convs[2].train()
model.conv1.bias.requires_grad_(False)
x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
torch.manual_seed(123)
np.random.seed(7)
random.seed(9)


def state():
    tensors = model.state_dict(keep_vars=True)
    return {
        "values": {k: v.detach().clone() for k, v in tensors.items()},
        "objects": {k: id(v) for k, v in tensors.items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "attributes": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in model.modules()),
        "grad mode": torch.is_grad_enabled(),
        "torch generator": torch.random.get_rng_state(),
        "numpy generator": np.random.get_state()[1].copy(),
        "python generator": random.getstate(),
        "torch function modes": torch._C._len_torch_function_stack(),
        "saved tensor hooks": torch._C._autograd._top_saved_tensors_default_hooks(True) is None,
        "SIGINT handler": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    }


def differences(a, b):
    found = [f"value of {k}" for k, v in a["values"].items() if not torch.equal(v, b["values"][k])]
    found += [key for key in a if key not in ("values", "torch generator", "numpy generator") and a[key] != b[key]]
    if not torch.equal(a["torch generator"], b["torch generator"]):
        found.append("torch generator")
    if not np.array_equal(a["numpy generator"], b["numpy generator"]):
        found.append("numpy generator")
    return found


def reset(before):
    with torch.no_grad():
        for k, v in model.state_dict(keep_vars=True).items():
            v.copy_(before["values"][k])
    for n, m in model.named_modules():
        m.training = before["training"][n]
    for n, p in model.named_parameters():
        p.requires_grad_(before["requires_grad"][n])
    torch.set_grad_enabled(True)
    torch.random.set_rng_state(before["torch generator"])
    np.random.set_state(("MT19937", before["numpy generator"], 624, 0, 0.0))
    random.setstate(before["python generator"])
    signal.signal(signal.SIGINT, signal.default_int_handler)


def checks():
    ps.layer_randomization(model, x)
    ps.layer_randomization(model, x, mode="cascading", randomization="gaussian", reuse_activations=False)
    ps.explain(model, x, "integrated_gradients", n_steps=4)


checks()  # warm-up
before = state()
start = time.perf_counter()
checks()
duration = time.perf_counter() - start
assert not differences(before, state()), differences(before, state())

report = {"random": {"interrupted": 0, "inside": 0, "failures": []}, "deterministic": []}
rng = random.Random(SEED)
deadline = time.perf_counter() + BUDGET
random_report = report["random"]
while random_report["interrupted"] < INTERRUPTS and time.perf_counter() < deadline:
    fired = threading.Event()

    def send():
        os.kill(os.getpid(), signal.SIGINT)
        fired.set()

    timer = threading.Timer(rng.uniform(0, duration), send)
    inside = False
    try:
        timer.start()
        inside = True
        checks()
        inside = False
        while not fired.wait(0.01):  # the signal comes after the checks: it lands here
            pass
        time.sleep(0.05)
    except KeyboardInterrupt:
        random_report["interrupted"] += 1
        random_report["inside"] += inside
    timer.join()
    found = differences(before, state())
    if found:
        random_report["failures"].append(found)
        reset(before)

# Deterministic moments, real signals sent from a profile function: (a) as a randomized layer's
# restore starts (the first copy_ after its block's generator resumes for the exit), (b) as a
# no_grad block that turns gradients back on is left, (c) as the library starts putting the global
# generators back (its first call of a generator's set_state).
randomized_code = randomization.randomized.__wrapped__.__code__
no_grad_exit = torch.autograd.grad_mode.no_grad.__exit__.__code__
package = os.path.dirname(ps.__file__) + os.sep


def restoring_layer(frame, event, arg, armed=[False], entered=set()):
    if event == "call" and frame.f_code is randomized_code:
        if id(frame) in entered:  # the generator resumes after its yield: the block is left
            entered.discard(id(frame))
            armed[0] = True
        else:
            entered.add(id(frame))
    elif event == "c_call" and armed[0] and getattr(arg, "__name__", "") == "copy_":
        armed[0] = False
        return True
    return False


def leaving_no_grad(frame, event, arg):
    return event == "call" and frame.f_code is no_grad_exit and frame.f_locals["self"].prev is True


def restoring_generators(frame, event, arg):
    return (event == "c_call" and getattr(arg, "__name__", "") == "set_state"
            and frame.f_code.co_filename.startswith(package))


for label, moment, ks in (("restoring a randomized layer", restoring_layer, (1, 3)),
                          ("leaving a no_grad block", leaving_no_grad, (1, 2)),
                          ("restoring the generators", restoring_generators, (1,))):
    for k in ks:
        seen = [0]

        def profile(frame, event, arg, moment=moment, k=k):
            if moment(frame, event, arg):
                seen[0] += 1
                if seen[0] == k:
                    os.kill(os.getpid(), signal.SIGINT)

        raised = False
        try:
            sys.setprofile(profile)
            try:
                ps.layer_randomization(model, x, mode="cascading", reuse_activations=False)
            finally:
                sys.setprofile(None)
        except KeyboardInterrupt:
            raised = True
        found = differences(before, state())
        report["deterministic"].append({"moment": f"{label} #{k}", "raised": raised, "sent": seen[0] >= k,
                                        "failures": found})
        if found:
            reset(before)
print(json.dumps(report))
'''


def test_real_interrupts_at_random_moments_leave_the_model_and_generators_as_they_were(tmp_path):
    script = tmp_path / "interrupts.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script), "150", "0", "15"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    random_part = report["random"]
    assert random_part["inside"] >= 20, random_part  # enough interrupts landed inside a check to mean something
    assert random_part["failures"] == [], random_part
    for moment in report["deterministic"]:
        assert moment["sent"], moment
        assert moment["raised"], f"the interrupt was swallowed: {moment}"  # deferred, never dropped
        assert moment["failures"] == [], moment


# ----------------------------------------------------------------------------------------------
# Models that write their own state during forward
# ----------------------------------------------------------------------------------------------


class CallCounter(nn.Module):
    """Counts its forward passes in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_tiny_cnn()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


class EmbeddingNet(nn.Module):
    """A 16x16 image's pixels weight the rows of an Embedding(max_norm=1.0), whose lookups
    renormalize the rows they read in place."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.emb = nn.Embedding(16, 6, max_norm=1.0)
            with torch.no_grad():
                self.emb.weight.mul_(3.0)  # rows longer than max_norm
            self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.emb(torch.arange(16, device=x.device))  # (16, 6)
        return self.fc(x.reshape(-1, 16, 16).mean(2) @ rows)


def full_state(model: nn.Module) -> dict:
    tensors = model.state_dict(keep_vars=True)
    return {
        "values": {k: v.detach().clone() for k, v in tensors.items()},
        "objects": {k: id(v) for k, v in tensors.items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": torch.is_grad_enabled(),
        "rng": (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
    }


def assert_same_state(before: dict, model: nn.Module) -> None:
    after = full_state(model)
    for key, value in before["values"].items():
        assert torch.equal(value, after["values"][key]), f"{key} changed"
    for key in ("objects", "training", "requires_grad", "grad"):
        assert before[key] == after[key], key
    assert torch.equal(before["rng"][0], after["rng"][0])
    assert np.array_equal(before["rng"][1], after["rng"][1])
    assert before["rng"][2] == after["rng"][2]


CHECKS = {
    "layer_randomization": lambda m, x: layer_randomization(m, x),
    "layer_randomization cascading": lambda m, x: layer_randomization(m, x, mode="cascading",
                                                                      reuse_activations=False),
    "explain": lambda m, x: explain(m, x, "integrated_gradients", n_steps=4),
    "agreement_matrix": lambda m, x: agreement_matrix(m, x, ["saliency", "input_x_gradient"], ["spearman"],
                                                      n_bootstrap=20),
    "hyperparameter_sweep": lambda m, x: hyperparameter_sweep(m, x, "smoothgrad", sweep={"nt_samples": [2]},
                                                              reference={"nt_samples": 2}),
    "accuracy_spread": lambda m, x: accuracy_spread(m, x, "smoothgrad", sweep={"nt_samples": [2]},
                                                    reference={"nt_samples": 2}),
}


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("make, written", [(CallCounter, "calls (buffer)"), (EmbeddingNet, "emb.weight (parameter)")])
def test_state_a_forward_pass_writes_is_put_back_and_reported(check, make, written):
    model, x = make(), tiny_images()
    before = full_state(model)
    with pytest.warns(SaliencyWarning, match=r"writes its own state") as warned:
        CHECKS[check](model, x)
    assert any(written in str(w.message) for w in warned), [str(w.message) for w in warned]
    assert_same_state(before, model)


@pytest.mark.parametrize("check", ["layer_randomization", "agreement_matrix", "hyperparameter_sweep", "accuracy_spread"])
def test_the_result_records_what_the_forward_pass_wrote(check):
    with pytest.warns(SaliencyWarning, match=r"writes its own state"):
        result = CHECKS[check](CallCounter(), tiny_images())
    assert "calls (buffer)" in result.model_writes
    assert "calls (buffer)" in result.to_dict()["model_writes"]
    result = CHECKS[check](make_tiny_cnn(), tiny_images())
    assert result.model_writes == () and result.to_dict()["model_writes"] == []


def test_a_failed_check_records_and_reports_what_the_forward_pass_wrote():
    model, x = CallCounter(), tiny_images()
    with pytest.warns(SaliencyWarning, match=r"calls \(buffer\)"), pytest.raises(SaliencyCheckFailed) as failed:
        assert_sensitive_to_layer_randomization(model, x, "saliency", sensitivity_threshold=1.0)
    assert "calls (buffer)" in failed.value.result.model_writes


def test_a_baseline_check_puts_back_what_the_forward_pass_wrote(tmp_path):
    model, x = CallCounter(), tiny_images()
    before = full_state(model)
    for _ in range(2):  # written, then compared
        with pytest.warns(SaliencyWarning, match=r"calls \(buffer\)"):
            check_baseline(model, x, tmp_path / "b.npz")
        assert_same_state(before, model)


def test_consistency_across_models_puts_back_every_models_writes():
    models = [CallCounter(), CallCounter()]
    with torch.no_grad():
        models[1].net.fc.weight.mul_(0.5)
    x = tiny_images(10)
    before = [full_state(m) for m in models]
    with pytest.warns(SaliencyWarning, match=r"models\[0\]\.calls \(buffer\), models\[1\]\.calls \(buffer\)"):
        explanation_consistency(models, x, "saliency", n_splits=2, metrics=["spearman"])
    for state, model in zip(before, models):
        assert_same_state(state, model)


def test_running_statistics_of_a_module_in_train_mode_are_put_back():
    model, x = make_tiny_cnn(), tiny_images()
    model.train()
    before = full_state(model)
    with pytest.warns(SaliencyWarning, match=r"bn\.running_mean \(buffer\), bn\.running_var \(buffer\)"):
        explain(model, x, eval_mode=False)
    assert_same_state(before, model)


def test_a_parameter_an_unknown_forward_writes_is_named_then_copied_by_later_checks():
    class Clipped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_tiny_cnn()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                self.net.fc.weight.mul_(0.5)  # its own weight "normalization", in place
            return self.net(x)

    model, x = Clipped(), tiny_images()
    with pytest.warns(SaliencyWarning, match=r"net\.fc\.weight \(parameter, not restored\)"):
        explain(model, x)
    before = full_state(model)
    with pytest.warns(SaliencyWarning, match=r"net\.fc\.weight \(parameter\)") as warned:
        explain(model, x)
    assert "not restored" not in str(warned[0].message)
    assert_same_state(before, model)


def test_a_model_without_side_effects_is_not_reported():
    model, x = make_tiny_cnn(), tiny_images()
    for check in CHECKS.values():
        check(model, x)  # filterwarnings=error: any SaliencyWarning fails the test


def test_grad_mode_modes_and_hooks_an_explainer_leaves_behind_are_undone():
    model, x = make_tiny_cnn(), tiny_images()
    before = full_state(model)

    def careless(m, inputs, target):
        out = torch.autograd.grad(m(inputs.requires_grad_()).sum(), inputs)[0]
        torch.set_grad_enabled(False)
        torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t).__enter__()
        m.fc.register_forward_hook(lambda *args: None)
        m.conv1.forward = lambda t: t
        return out

    explain(model, x, careless)
    assert_same_state(before, model)
    assert torch._C._autograd._top_saved_tensors_default_hooks(True) is None
    assert not model.fc._forward_hooks and "forward" not in vars(model.conv1)


def test_an_isolation_marks_its_thread_and_puts_every_generator_back():
    """The public interface the guard uses: inside an isolation its devices are known (none on the
    CPU), the generators are seeded as ``seeded`` seeds them, and they come back on the way out."""
    from pytest_saliency.core.rng import isolated_devices, isolated_rngs, seeded

    before = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with seeded(5):
        expected = torch.rand(3)
    assert isolated_devices() is None
    with isolated_rngs(5):
        assert isolated_devices() == []
        assert torch.equal(torch.rand(3), expected)
        np.random.rand(2), random.random()
    assert isolated_devices() is None
    assert torch.equal(torch.random.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]



USAGE_ERROR_TESTS = '''
import torch
from torch import nn
import pytest_saliency as ps


class Crashing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        raise RuntimeError("the user's model crashed here")


def test_bad_method():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    ps.assert_sensitive_to_layer_randomization(model, torch.rand(4, 1, 8, 8), method="no_such_method")


def test_bad_seed_model():
    def factory(seed):
        return nn.Linear(64, 3)
    ps.assert_seed_consistency_above(factory, torch.rand(4, 1, 8, 8), seeds=[0, 1], metric="sign_agreement")


def test_crash():
    ps.assert_sensitive_to_layer_randomization(Crashing(), torch.rand(4, 64))
'''


def _failure_section(lines: list[str], name: str) -> list[str]:
    """One test's failure report: from its ``____ name ____`` header to the next header."""
    start = next(i for i, line in enumerate(lines) if line.startswith("__") and f" {name} " in line)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("__", "=="))), len(lines))
    return lines[start:end]


def test_a_usage_error_shows_the_users_line_and_the_message_not_the_library(pytester):
    path = pytester.makepyfile(test_usage=USAGE_ERROR_TESTS)
    source = path.read_text().splitlines()

    def line_of(text: str) -> int:
        return next(number for number, line in enumerate(source, 1) if text in line)

    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=3)
    lines = result.outlines
    bad = _failure_section(lines, "test_bad_method")
    text = "\n".join(bad)
    assert "SaliencyUsageError: unknown method 'no_such_method'" in text
    assert 'method="no_such_method")' in text and f"test_usage.py:{line_of('no_such_method')}: SaliencyUsageError" in text
    assert "pytest_saliency" not in text.replace("pytest_saliency.exceptions.SaliencyUsageError", "")
    assert len(bad) < 40, text
    # Seed consistency's check of the first model: the user's line and the message; only the cause
    # (torch's own error in the user's model) keeps its traceback.
    seed = "\n".join(_failure_section(lines, "test_bad_seed_model"))
    assert "model 'seed=0' (Linear) cannot run on inputs of shape (4, 1, 8, 8)" in seed
    assert f"test_usage.py:{line_of('seeds=[0, 1]')}: SaliencyUsageError" in seed
    assert "integrity.py" not in seed and "explainers.py" not in seed and "validation.py" not in seed
    # A crash inside the user's model keeps its full traceback down to the model's line.
    crash = "\n".join(_failure_section(lines, "test_crash"))
    assert 'raise RuntimeError("the user\'s model crashed here")' in crash and f"test_usage.py:{line_of('crashed here')}: RuntimeError" in crash
    assert f"test_usage.py:{line_of('(Crashing()')}: SaliencyUsageError" in crash
