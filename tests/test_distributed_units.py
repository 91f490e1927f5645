"""Units of the torch.distributed scale-out, in process: who runs which batch, how a tensor is cut
into shards, the environment knobs, the exchange without and with a process group (world size 1,
made here), the sharded path giving the plain results, the plugin's options and device per rank,
and the launcher's environment and exit status (one cheap ``--saliency-devices=cpu,cpu`` run)."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_cnn, tiny_images

import pytest_saliency as ps
from pytest_saliency import SaliencyUsageError
from pytest_saliency.checks import regression, streaming
from pytest_saliency.checks.streaming import has_example_rows, owner, tensor_shards
from pytest_saliency.core import distributed
from pytest_saliency.core.devices import rank_device_name
from pytest_saliency.core.distributed import (
    Ranks,
    exchange,
    is_main,
    launched,
    ranks,
    shard_size,
    unsharded,
)
from pytest_saliency.core.stream import chunks
from pytest_saliency.plugin.config import parse_devices, parse_positive
from pytest_saliency.plugin.launch import DEVICES_VARIABLE, rank_environment

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", DEVICES_VARIABLE, distributed.SHARD_SIZE_VARIABLE)


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts outside torchrun, with the default shard size."""
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def one_rank() -> object:
    """A gloo process group of world size 1 in this process, destroyed after the test."""
    dist = torch.distributed
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


@pytest.fixture
def exchanges(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the tag of every exchange a check makes (the proof that it went the sharded way)."""
    tags: list[str] = []

    def recording(real):
        def wrapper(tag, work):
            tags.append(tag)
            return real(tag, work)

        return wrapper

    monkeypatch.setattr(streaming, "exchange", recording(streaming.exchange))
    monkeypatch.setattr(regression, "exchange", recording(regression.exchange))
    return tags


@pytest.fixture
def batch_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the number of inputs of every batch a streamed or sharded check runs."""
    sizes: list[int] = []
    real = streaming._call

    def wrapper(function, signature, call, chunk, index, *part):
        sizes.append(int(chunk.inputs.shape[0]))
        return real(function, signature, call, chunk, index, *part)

    monkeypatch.setattr(streaming, "_call", wrapper)
    return sizes


def _numbers(result: object, *leave_out: str) -> dict:
    data = result.to_dict()
    for key in ("seconds", *leave_out):
        data.pop(key, None)
    return data


#: What images="auto" reports differently when the check is sharded (test_sharded_auto_reports_the_tensors_run).
AUTO_DIFFERS = ("images_available", "stopped_early", "reproduce")


# --- who runs which batch; shards of a tensor -------------------------------------------------------------------


@pytest.mark.parametrize(("batches", "size"), [(4, 2), (5, 2), (7, 3), (2, 3), (10, 4), (1, 2)])
def test_owner_gives_each_rank_a_contiguous_balanced_share(batches: int, size: int) -> None:
    """Known length: ranks own runs of consecutive batches, in rank order, sizes within one of each other."""
    owners = [owner(i, batches, Ranks(0, size)) for i in range(batches)]
    assert owners == sorted(owners) and set(owners) <= set(range(size))
    counts = [owners.count(rank) for rank in range(size)]
    assert sum(counts) == batches and max(counts) - min(counts) <= 1
    # the rank's own number does not change the answer: every rank computes the same plan
    assert owners == [owner(i, batches, Ranks(size - 1, size)) for i in range(batches)]


def test_owner_of_a_stream_of_unknown_length_is_round_robin() -> None:
    """No length (None or 0): batch i goes to rank i mod size."""
    assert [owner(i, None, Ranks(1, 3)) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [owner(i, 0, Ranks(0, 2)) for i in range(4)] == [0, 1, 0, 1]


def test_tensor_shards_cut_the_inputs_and_per_input_forward_kwargs_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of PYTEST_SALIENCY_SHARD_SIZE rows (the last shorter); per-input kwargs cut with them, the rest left whole."""
    monkeypatch.setenv(distributed.SHARD_SIZE_VARIABLE, "4")
    x = tiny_images(10)
    mask, scale = torch.arange(10 * 3).reshape(10, 3), torch.tensor([1.0, 2.0, 3.0])
    stream, rest = tensor_shards(x, {"mask": mask, "scale": scale, "flag": True})
    assert set(rest) == {"scale", "flag"} and rest["scale"] is scale and rest["flag"] is True
    parts = list(chunks(stream, "cpu"))
    assert [int(c.inputs.shape[0]) for c in parts] == [4, 4, 2] and [c.start for c in parts] == [0, 4, 8]
    assert torch.equal(torch.cat([c.inputs for c in parts]), x)
    assert [list(c.forward_kwargs) for c in parts] == [["mask"]] * 3
    assert torch.equal(torch.cat([c.forward_kwargs["mask"] for c in parts]), mask)
    # only per-input kwargs: nothing left to pass whole; no kwargs at all: None passes through
    assert tensor_shards(x, {"mask": mask})[1] is None and tensor_shards(x, None)[1] is None
    monkeypatch.setenv(distributed.SHARD_SIZE_VARIABLE, "32")
    assert [int(c.inputs.shape[0]) for c in chunks(tensor_shards(x)[0], "cpu")] == [10]


def test_has_example_rows_finds_per_input_tensors_also_inside_mappings() -> None:
    """A tensor with one row per input, given directly or as a value of **method_kwargs, is found; others are not."""
    n = 5
    assert has_example_rows({"baselines": torch.zeros(n, 1, 4, 4)}, n)
    assert has_example_rows({"method_kwargs": {"baselines": torch.zeros(n, 3)}}, n)
    assert not has_example_rows({"baselines": torch.zeros(1, 1, 4, 4), "k": 0.1, "name": "x"}, n)
    assert not has_example_rows({"method_kwargs": {"baselines": torch.zeros(n + 1)}, "scalar": torch.tensor(5.0)}, n)
    assert not has_example_rows({}, n)


# --- environment knobs and the exchange without a process group --------------------------------------------------


def test_shard_size_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset or blank: the default (32); otherwise the number given."""
    assert shard_size() == distributed.DEFAULT_SHARD_SIZE == 32
    monkeypatch.setenv(distributed.SHARD_SIZE_VARIABLE, "  ")
    assert shard_size() == 32
    monkeypatch.setenv(distributed.SHARD_SIZE_VARIABLE, "8")
    assert shard_size() == 8
    monkeypatch.setenv(distributed.SHARD_SIZE_VARIABLE, " 1 ")
    assert shard_size() == 1


@pytest.mark.parametrize(("raw", "message"), [
    ("eight", r"PYTEST_SALIENCY_SHARD_SIZE='eight' is not a number of examples; set it to a positive integer"),
    ("2.5", r"'2.5' is not a number of examples"),
    ("0", r"PYTEST_SALIENCY_SHARD_SIZE='0': a shard needs at least one example"),
    ("-4", r"'-4': a shard needs at least one example"),
])
def test_a_bad_shard_size_is_a_usage_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str,
                                                               message: str) -> None:
    """Anything but a positive integer is refused with a SaliencyUsageError that names the variable and value."""
    monkeypatch.setenv(distributed.SHARD_SIZE_VARIABLE, raw)
    with pytest.raises(SaliencyUsageError, match=message):
        shard_size()


def test_exchange_without_a_process_group_runs_the_work_once() -> None:
    """No group: exchange is [work()], work called exactly once, its exception propagating as is."""
    calls: list[int] = []
    assert ranks() is None
    assert exchange("tag", lambda: calls.append(1) or "result") == ["result"] and calls == [1]
    error = ValueError("boom")

    def failing() -> None:
        raise error

    with pytest.raises(ValueError) as caught:
        exchange("tag", failing)
    assert caught.value is error


def test_launched_and_is_main_follow_torchruns_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """launched() needs WORLD_SIZE and RANK; without a group is_main() is RANK == 0 (or True when not launched)."""
    assert not launched() and is_main()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launched() and is_main()  # RANK missing: not a launcher's process
    monkeypatch.setenv("RANK", "1")
    assert launched() and not is_main()
    monkeypatch.setenv("RANK", "0")
    assert launched() and is_main()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("RANK", "1")
    assert not launched() and is_main()


# --- a process group of one rank, in this process ----------------------------------------------------------------


def test_ranks_inside_a_group_and_unsharded_turns_it_off(one_rank, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a group ranks() is this process's Ranks; inside unsharded() (nested too) it is None, and back after;
    is_main() asks the group, not RANK."""
    assert ranks() == Ranks(0, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "1")
    assert launched() and is_main()  # the group says rank 0
    with unsharded():
        assert ranks() is None
        with unsharded():
            assert ranks() is None
        assert ranks() is None
    assert ranks() == Ranks(0, 1)


def test_exchange_in_a_group_gathers_and_reraises_the_works_own_exception(one_rank) -> None:
    """One rank: exchange returns [result] (tensors come back equal); an exception in work is re-raised as is."""
    value = {"t": torch.arange(3.0), "n": 2}
    (back,) = exchange("t", lambda: value)
    assert back["n"] == 2 and torch.equal(back["t"], value["t"])

    class Custom(Exception):
        pass

    error = Custom("raised by the work")

    def failing() -> None:
        raise error

    with pytest.raises(Custom) as caught:
        exchange("t", failing)
    assert caught.value is error
    usage = SaliencyUsageError("bad argument")
    with pytest.raises(SaliencyUsageError) as caught_usage:
        exchange("t", lambda: (_ for _ in ()).throw(usage))
    assert caught_usage.value is usage
    assert exchange("t", lambda: 7) == [7]  # the group still works after a failure


@pytest.mark.parametrize("images", ["all", "auto", 6], ids=["all", "auto", "cap-cuts-a-shard"])
def test_layer_randomization_sharded_gives_the_plain_numbers(one_rank, exchanges, batch_calls,
                                                             monkeypatch: pytest.MonkeyPatch, images: object) -> None:
    """In a group, IPR over shards of 4 (the cap of 6 cutting the second shard) equals the plain run but for seconds."""
    model, x = make_tiny_cnn(), tiny_images(11)
    options = {"images": images, "image_batch": 4, "n_bootstrap": 200}
    with unsharded():
        plain = ps.layer_randomization(model, x, "saliency", **options)
    assert exchanges == [] and batch_calls == []
    monkeypatch.setenv(distributed.SHARD_SIZE_VARIABLE, "4")
    sharded = ps.layer_randomization(model, x, "saliency", **options)
    assert _numbers(sharded, *AUTO_DIFFERS) == _numbers(plain, *AUTO_DIFFERS)
    assert sharded.n_images == plain.n_images and sharded.ssim == plain.ssim
    if images != "auto":
        assert _numbers(sharded) == _numbers(plain)
    # it did go the sharded way: one round of every shard, or (auto) one shard per round
    assert all("layer_randomization round" in tag for tag in exchanges)
    if images == "auto":
        assert len(exchanges) == len(batch_calls) and batch_calls == [4, 4, 3][:len(batch_calls)]
        assert sum(batch_calls) >= plain.n_images
    elif images == 6:
        assert plain.n_images == 6 and len(exchanges) == 1 and batch_calls == [4, 4]  # the 2nd shard runs 2 of its 4
    else:
        assert plain.n_images == 11 and len(exchanges) == 1 and batch_calls == [4, 4, 3]


def test_sharded_auto_reports_the_tensors_run(one_rank, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharded images="auto" says what the plain run says: images available, why it stopped, how to reproduce it."""
    model, x = make_tiny_cnn(), tiny_images(11)
    options = {"images": "auto", "image_batch": 4, "n_bootstrap": 200}
    with unsharded():
        plain = ps.layer_randomization(model, x, "saliency", **options)
    monkeypatch.setenv(distributed.SHARD_SIZE_VARIABLE, "4")
    sharded = ps.layer_randomization(model, x, "saliency", **options)
    assert plain.stopped_early and "images='auto'" in plain.to_dict()["reproduce"]
    assert {key: sharded.to_dict()[key] for key in AUTO_DIFFERS} == {key: plain.to_dict()[key] for key in AUTO_DIFFERS}


def test_agreement_matrix_sharded_gives_the_plain_numbers(one_rank, exchanges, batch_calls, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a group, the agreement matrix over shards of 3 equals the plain run but for seconds."""
    model, x = make_tiny_cnn(), tiny_images(8)
    arguments = {"methods": ["saliency", "input_x_gradient"], "metrics": ["feature_agreement", "rank_correlation"],
                     "n_bootstrap": 200}
    with unsharded():
        plain = ps.agreement_matrix(model, x, **arguments)
    assert exchanges == [] and batch_calls == []
    monkeypatch.setenv(distributed.SHARD_SIZE_VARIABLE, "3")
    sharded = ps.agreement_matrix(model, x, **arguments)
    assert _numbers(sharded) == _numbers(plain)
    assert len(exchanges) == 1 and "agreement_matrix round 0" in exchanges[0] and batch_calls == [3, 3, 2]


def test_check_baseline_compare_sharded_gives_the_plain_numbers(one_rank, exchanges, monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """In a group, comparing with a stored baseline over shards of 4 equals the plain comparison but for seconds."""
    x = tiny_images(10)
    path = tmp_path / "b.npz"
    with unsharded():
        assert regression.check_baseline(make_tiny_cnn(), x, path).status == "written"
        plain = regression.check_baseline(make_tiny_cnn(seed=3), x, path)
    assert plain.status == "compared" and exchanges == []
    monkeypatch.setenv(distributed.SHARD_SIZE_VARIABLE, "4")
    sharded = regression.check_baseline(make_tiny_cnn(seed=3), x, path)
    assert _numbers(sharded) == _numbers(plain) and sharded.status == "compared"
    assert len(exchanges) == 2 and exchanges[0].endswith("b.npz (write?)")  # rank 0 decides; then the shards' records
    assert exchanges[1].endswith("check_baseline b.npz")


def test_check_baseline_writes_in_a_group_as_it_would_alone(one_rank, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """In a group, a missing baseline is written (by rank 0) with the same maps and result as outside one."""
    x = tiny_images(6)
    monkeypatch.setenv(distributed.SHARD_SIZE_VARIABLE, "4")
    grouped = regression.check_baseline(make_tiny_cnn(), x, tmp_path / "grouped.npz")
    with unsharded():
        alone = regression.check_baseline(make_tiny_cnn(), x, tmp_path / "alone.npz")
    assert grouped.status == alone.status == "written"
    grouped_maps, grouped_meta = regression.read_baseline(tmp_path / "grouped.npz")
    alone_maps, alone_meta = regression.read_baseline(tmp_path / "alone.npz")
    grouped_meta.pop("created"), alone_meta.pop("created")
    assert (grouped_maps == alone_maps).all() and grouped_meta == alone_meta


def test_per_input_ig_baselines_make_the_check_run_whole(one_rank, exchanges, batch_calls, monkeypatch: pytest.MonkeyPatch) -> None:
    """A baselines= tensor with one row per input is not cut into shards: the check runs whole, without error."""
    model, x = make_tiny_cnn(), tiny_images(6)
    baselines = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 0.1
    monkeypatch.setenv(distributed.SHARD_SIZE_VARIABLE, "2")
    options = {"n_steps": 4, "baselines": baselines, "n_bootstrap": 200}
    grouped = ps.layer_randomization(model, x, "integrated_gradients", **options)
    with unsharded():
        plain = ps.layer_randomization(model, x, "integrated_gradients", **options)
    assert exchanges == [] and batch_calls == [] and _numbers(grouped) == _numbers(plain) and grouped.n_images == 6


# --- plugin options, the device of each rank, the launcher -------------------------------------------------------


@pytest.mark.parametrize(("value", "parsed"), [
    ("all", ("all",)), (" ALL ", ("all",)),
    ("cuda:0,cuda:1", ("cuda:0", "cuda:1")), ("cpu,cpu", ("cpu", "cpu")),
    (" CPU , cuda ,", ("cpu", "cuda")), ("cuda:3", ("cuda:3",)),
])
def test_parse_devices_reads_all_and_lists(value: str, parsed: tuple[str, ...]) -> None:
    """--saliency-devices: all, or a comma list of cpu/cuda/cuda:N, case and spaces ignored."""
    assert parse_devices(value) == parsed


@pytest.mark.parametrize("value", ["", ",", "auto", "cpu,auto", "gpu", "cuda:x", "cuda:0,tpu"])
def test_parse_devices_refuses_anything_else(value: str) -> None:
    """An empty list, auto, or an unknown device is an argparse error naming the value or the device."""
    with pytest.raises(argparse.ArgumentTypeError, match=r"invalid (--)?saliency[ -]device"):
        parse_devices(value)


def test_parse_positive() -> None:
    """Positive finite numbers are read as floats; zero, negatives, NaN, infinity and words are refused."""
    assert parse_positive("60") == 60.0 and parse_positive("0.5") == 0.5
    for bad in ("0", "-1", "nan", "inf", "soon", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a positive( finite)? number"):
            parse_positive(bad)


def test_parse_count() -> None:
    """A shard size is a whole number of examples, at least 1."""
    from pytest_saliency.plugin.config import parse_count

    assert parse_count("8") == 8 and parse_count(" 32 ") == 32
    for bad in ("0", "-3", "2.5", "inf", "eight", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected (a whole number|at least 1)"):
            parse_count(bad)


def test_resolve_config_picks_the_distributed_options(pytester: pytest.Pytester) -> None:
    """--saliency-devices/-timeout/-shard-size land in SaliencyConfig (shard size an int); defaults otherwise."""
    from pytest_saliency.plugin import resolve_config

    config = pytester.parseconfig("--saliency", "--saliency-devices=cpu,cpu", "--saliency-timeout=7.5",
                                  "--saliency-shard-size=8")
    resolved = resolve_config(config)
    assert resolved.devices == ("cpu", "cpu") and resolved.timeout == 7.5
    assert resolved.shard_size == 8 and isinstance(resolved.shard_size, int)
    default = resolve_config(pytester.parseconfig("--saliency"))
    assert default.devices == () and default.timeout == 1800.0 and default.shard_size is None
    with pytest.raises(pytest.UsageError):
        pytester.parseconfig("--saliency-timeout=0")


@pytest.mark.parametrize("value", ["2.5", "inf"])
def test_a_shard_size_that_is_not_a_whole_number_is_a_usage_error(pytester: pytest.Pytester, value: str) -> None:
    """--saliency-shard-size is a number of examples: a fraction or infinity is refused as a usage error."""
    from pytest_saliency.plugin import resolve_config

    with pytest.raises(pytest.UsageError):
        resolve_config(pytester.parseconfig("--saliency", f"--saliency-shard-size={value}"))


def test_rank_device_name_takes_the_local_ranks_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun the LOCAL_RANK-th listed device (PYTEST_SALIENCY_DEVICES first); outside it, the name given."""
    assert rank_device_name("auto", ("cpu", "cuda:1")) == "auto"  # not launched
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device_name("auto", ("cpu", "cuda:1")) == "cuda:1"
    assert rank_device_name("auto", ()) == "auto"  # nothing listed: --saliency-device decides
    monkeypatch.setenv(DEVICES_VARIABLE, "cuda:2,cuda:5")  # the launcher's list wins over the option's
    assert rank_device_name("auto", ("cpu", "cpu")) == "cuda:5"
    monkeypatch.setenv(DEVICES_VARIABLE, "all")
    assert rank_device_name("auto", ()) == "cuda"
    monkeypatch.delenv(DEVICES_VARIABLE)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert rank_device_name("auto", ("cuda:1", "cuda:0")) == "cuda:1"


def test_rank_device_name_with_too_few_devices_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A local rank past the list's end is a SaliencyUsageError naming the list and the rank."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(SaliencyUsageError, match=r"lists 2 device\(s\) \(cpu,cpu\).*local rank 2.*--nproc-per-node"):
        rank_device_name("auto", ("cpu", "cpu"))


def test_rank_environment_is_torchruns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank gets torchrun's variables and the device list; os.environ itself is left alone."""
    monkeypatch.setenv("KEEP_ME", "1")
    before = dict(os.environ)
    env = rank_environment(1, ["cuda:0", "cuda:1", "cuda:2"], 29511)
    assert os.environ == before and env["KEEP_ME"] == "1"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("1", "1", "3", "3")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["GROUP_RANK"]) == ("127.0.0.1", "29511", "0")
    assert env[DEVICES_VARIABLE] == "cuda:0,cuda:1,cuda:2"


def test_rank_environment_shares_the_cores_on_the_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU ranks: OMP_NUM_THREADS = cores // ranks (at least 1) unless already set; GPU ranks: untouched."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert rank_environment(0, ["cpu", "cpu"], 1)["OMP_NUM_THREADS"] == "4"
    assert rank_environment(0, ["cpu"] * 3, 1)["OMP_NUM_THREADS"] == "2"
    assert rank_environment(0, ["cpu"] * 16, 1)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in rank_environment(0, ["cuda:0", "cuda:1"], 1)
    assert "OMP_NUM_THREADS" not in rank_environment(0, ["cpu", "cuda:0"], 1)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert rank_environment(0, ["cpu", "cpu"], 1)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert rank_environment(1, ["cpu", "cpu"], 1)["OMP_NUM_THREADS"] == "3"


# --- the plugin through pytester ----------------------------------------------------------------------------------

RANKED_TEST = '''
import os

import pytest


def test_per_rank():
    if os.environ.get("RANK") == "1":
        pytest.exit("rank 1 leaves", returncode=3)
'''


def test_devices_and_xdist_together_are_a_usage_error(pytester: pytest.Pytester) -> None:
    """--saliency-devices with several devices and -n is refused before anything starts."""
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest("--saliency", "--saliency-devices=cuda:0,cuda:1", "-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--saliency-devices starts one pytest process per device*cannot be combined*-n*"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA sees no GPU")
def test_devices_all_without_cuda_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """--saliency-devices=all with no visible GPU is a usage error that says to list devices instead."""
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest("--saliency", "--saliency-devices=all")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--saliency-devices=all*CUDA sees none here*cpu,cpu*"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA sees no GPU")
def test_one_listed_device_is_the_sessions_device(pytester: pytest.Pytester) -> None:
    """--saliency-devices=cuda:3 alone runs this process on cuda:3: with no GPU, the fixture fails naming CUDA."""
    pytester.makepyfile(test_device="def test_device(saliency_device):\n    print('DEVICE', saliency_device)\n")
    result = pytester.runpytest("--saliency", "--saliency-devices=cuda:3", "-s")
    result.assert_outcomes(errors=1)
    assert "DEVICE" not in result.stdout.str() and "cuda" in result.stdout.str().lower()


def test_cpu_cpu_launch_reports_rank_headers_and_the_failing_ranks_status(pytester: pytest.Pytester) -> None:
    """One --saliency-devices=cpu,cpu run: rank 0 prints its header on the terminal, rank 1's output (its header
    too) goes to ranks/rank-1.log, and the exit status is rank 1's (3), with the log's path printed."""
    pytester.makepyfile(test_ranked=RANKED_TEST)
    result = pytester.runpytest_subprocess("--saliency", "--saliency-devices=cpu,cpu", "--saliency-timeout=60",
                                           "-p", "no:cacheprovider", timeout=180)
    assert result.ret == 3, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["saliency: device=auto*, rank 0 of 2 (every check split across the ranks*",
                                 "*1 passed*"])
    log = pytester.path / ".saliency" / "ranks" / "rank-1.log"
    result.stderr.fnmatch_lines([f"saliency: rank 1 exited with status 3; its output: {log}"])
    text = log.read_text()
    assert "rank 1 of 2" in text and "rank 1 leaves" in text
    assert "rank 0 of 2" not in text


# ---------------------------------------------------------------------------------- review fixes


def test_a_loader_with_a_distributed_sampler_is_refused_with_what_to_pass() -> None:
    """Every rank must read the whole loader: a DistributedSampler (even without shuffling) is
    refused, saying to pass a loader over the whole data set."""
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    data = TensorDataset(torch.rand(8, 1, 4, 4))
    loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=0, shuffle=False))
    with pytest.raises(SaliencyUsageError, match="DistributedSampler.*over the whole data set"):
        streaming.check_sampler(loader)
    streaming.check_sampler(DataLoader(data, batch_size=2))  # a plain loader is fine


class _Process:
    """A stand-in for a rank's process: exits with ``code`` at the ``at``-th poll (None: never)."""

    def __init__(self, code: int, at: int | None) -> None:
        self.code, self.at, self.polls, self.stopped = code, at, 0, False

    def poll(self) -> int | None:
        self.polls += 1
        if self.stopped:
            return -15
        return self.code if self.at is not None and self.polls >= self.at else None

    def terminate(self) -> None:
        self.stopped = True

    def kill(self) -> None:
        self.stopped = True

    def wait(self, timeout: float | None = None) -> int | None:
        return self.poll()


def test_the_launcher_stops_the_ranks_left_waiting_for_one_that_failed(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """A rank that fails while the others run on (it never joined) gets them stopped after the
    grace period instead of leaving them waiting for the timeout; a signal death reads 128 + N."""
    from pytest_saliency.plugin import launch

    monkeypatch.setattr(launch, "GRACE", 0.2)
    monkeypatch.setattr(launch.time, "sleep", lambda seconds: None)
    waiting, failed = _Process(0, None), _Process(3, 1)
    codes = launch._watch([waiting, failed], tmp_path)  # type: ignore[list-item]
    assert waiting.stopped and codes == [143, 3]
    # a rank whose tests failed ended normally: the other runs to its end (its reports are written)
    finishing, failed_tests = _Process(0, 40), _Process(1, 1)
    assert launch._watch([finishing, failed_tests], tmp_path) == [0, 1]  # type: ignore[list-item]
    assert not finishing.stopped


def test_torchrun_with_xdist_is_a_usage_error(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun, pytest-xdist's -n would start workers that all claim the rank: refused."""
    pytester.makepyfile("def test_nothing():\n    pass\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = pytester.runpytest_subprocess("--saliency", "-n", "2", "-p", "no:cacheprovider")
    result.stderr.fnmatch_lines(["*pytest-xdist's -n would start more processes*"])
    assert result.ret != 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA sees no GPU")
def test_a_listed_device_the_machine_lacks_is_refused_before_any_process_starts(pytester: pytest.Pytester) -> None:
    """--saliency-devices=cpu,cuda:1 without CUDA: a usage error naming the entry, no rank started."""
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--saliency", "--saliency-devices=cpu,cuda:1", "-p", "no:cacheprovider")
    result.stderr.fnmatch_lines(["*--saliency-devices=cpu,cuda:1: cuda:1: *CUDA is not available*"])
    assert result.ret == 4 and not (pytester.path / ".saliency" / "ranks").exists()


def test_call_digest_reads_structure_not_values_devices_or_addresses() -> None:
    """The digest the ranks compare: equal for tensors of one shape on other devices or with other
    values, for sets in any order, for objects whose text holds an address; different for another
    method or another shape."""
    from pytest_saliency.checks.streaming import call_digest

    x = torch.rand(4, 3)

    class Thing:
        pass

    same = {"inputs": x, "method": "saliency", "layers": {"a", "b", "c"}, "cache": Thing(), "model": torch.nn.ReLU()}
    assert call_digest(same) == call_digest({**same, "inputs": torch.zeros(4, 3, device="meta"),
                                             "layers": {"c", "b", "a"}, "cache": Thing(), "model": torch.nn.Tanh()})
    assert call_digest(same) != call_digest({**same, "method": "integrated_gradients"})
    assert call_digest(same) != call_digest({**same, "inputs": torch.rand(5, 3)})


def test_only_plain_in_order_dataloaders_are_loaded_per_rank() -> None:
    """A rank loads only its batches of a plain DataLoader over a map-style dataset in order (its
    batch sampler's index lists, or a list of them); a subclass, a random batch sampler, or a
    batch sampler whose length is not its number of batches is read whole by every rank."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    x = torch.rand(10, 2)
    assert streaming._plan(DataLoader(x, batch_size=4), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    uneven = [[0, 1, 2], [3], [4, 5, 6, 7, 8, 9]]
    assert streaming._plan(DataLoader(x, batch_sampler=uneven), 3) == uneven

    class Doubled(DataLoader):
        pass

    assert streaming._plan(Doubled(x, batch_size=4), 3) is None
    assert streaming._plan(DataLoader(x, batch_sampler=BatchSampler(RandomSampler(x), 4, False)), 3) is None
    assert streaming._plan(DataLoader(x, batch_size=4), None) is None  # no length: its batches are not known
    assert streaming._plan(DataLoader(x, batch_size=4), 4) is None  # a length that is not its number of batches


def test_a_collate_that_changes_the_rows_is_read_whole(one_rank: object) -> None:
    """A collate that does not give one row per index (pairs joined by torch.cat) is not loaded per
    rank (its batch sizes are unknown without loading): the check reads it whole, as before."""
    import inspect

    from torch.utils.data import DataLoader

    def reader(loader: DataLoader) -> object:
        def check(inputs: object) -> None:
            return None

        spec = streaming.StreamSpec(lambda *args: None, lambda part: part)
        return streaming._ShardedRun(check, inspect.signature(check), {"inputs": loader}, spec, Ranks(0, 1)).reader

    pairs = torch.rand(6, 2, 1, 8, 8)
    assert isinstance(reader(DataLoader(pairs, batch_size=3, collate_fn=lambda items: torch.cat(list(items)))),
                      streaming._AllBatches)
    assert isinstance(reader(DataLoader(pairs.flatten(0, 1), batch_size=3)), streaming._OwnBatches)
