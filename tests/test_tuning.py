"""Tuning tables as data: lookup, validation against the search space, and `auto` choosing the
backend measured fastest for (GPU arch, C, dtype), with the declared order as fallback."""
import json

import pytest
import torch

from gmf_kernels import tuning
from gmf_kernels.backends import BACKEND_NAMES, DECLARED_ORDER, explain, get_backend, select_backend
from helpers import problem


def write(table_dir, arch, data):
    (table_dir / f"{arch}.json").write_text(json.dumps({"arch": arch, "measured": True, **data}))
    tuning.clear_cache()


@pytest.fixture
def two_fake_fused(monkeypatch):
    """cuda and triton both able to run a (mocked) CUDA problem."""
    for n in ("cuda", "triton"):
        monkeypatch.setattr(get_backend(n), "not_supported_reasons", lambda p: [])
    yield


def cuda_problem(cap=(9, 0), C=80, dtype=torch.bfloat16):
    return problem(device_type="cuda", device_capability=cap, dim=C, dtype=dtype, explicit=False)


def test_auto_uses_declared_order_without_a_table(table_dir, two_fake_fused):
    """Without a measurement, each kind of call takes its declared order: inference triton first, training (and
    gradients) cuda first, as the H200 measured them; both orders hold every backend once."""
    assert select_backend(cuda_problem(), None).name == DECLARED_ORDER[False][0] == "triton"
    for training, needs_grad in ((True, False), (False, True)):
        p = problem(device_type="cuda", device_capability=(9, 0), dim=80, dtype=torch.bfloat16, explicit=False,
                    training=training, needs_grad=needs_grad)
        assert select_backend(p, None).name == DECLARED_ORDER[True][0] == "cuda"
    assert all(sorted(order) == sorted(BACKEND_NAMES) for order in DECLARED_ORDER.values())


def test_auto_picks_the_measured_fastest(table_dir, two_fake_fused):
    write(table_dir, "sm_90", {"backends": {"80": {"bfloat16": {"cuda": 120.0, "triton": 90.0, "batch": 128}}}})
    assert select_backend(cuda_problem(), None).name == "triton"
    write(table_dir, "sm_90", {"backends": {"80": {"bfloat16": {"cuda": 90.0, "triton": 120.0, "batch": 128}}}})
    assert select_backend(cuda_problem(), None).name == "cuda"
    # another width, dtype or architecture without a measurement: declared order
    assert select_backend(cuda_problem(C=160), None).name == DECLARED_ORDER[False][0]
    assert select_backend(cuda_problem(dtype=torch.float32), None).name == DECLARED_ORDER[False][0]
    assert select_backend(cuda_problem(cap=(8, 0)), None).name == DECLARED_ORDER[False][0]
    assert explain(cuda_problem())["tuned"] == ["cuda: 90", "triton: 120"]


@pytest.mark.parametrize("training,needs_grad", [(True, True), (True, False), (False, True)])
def test_auto_ranks_training_calls_by_training_steps(table_dir, two_fake_fused, training, needs_grad):
    """A training call (train mode, or gradients) is ranked by the measured training steps
    ("backends_train", tune.py --train), never by the pre-projection's times, which say nothing of a
    backward: without a training measurement, the declared order; a call without either keeps the
    pre-projection's ranking."""
    fwd = {"backends": {"80": {"bfloat16": {"cuda": 120.0, "triton": 90.0, "batch": 128}}}}
    train = problem(device_type="cuda", device_capability=(9, 0), dim=80, dtype=torch.bfloat16, explicit=False,
                    training=training, needs_grad=needs_grad)
    write(table_dir, "sm_90", fwd)
    assert select_backend(train, None).name == DECLARED_ORDER[True][0] == "cuda"   # not the forward's triton
    assert select_backend(cuda_problem(), None).name == "triton"
    # the forward's times now favour cuda, the training steps' triton: each kind of call takes its own
    fwd = {"backends": {"80": {"bfloat16": {"cuda": 90.0, "triton": 120.0, "batch": 128}}}}
    write(table_dir, "sm_90", {**fwd, "backends_train": {"80": {"bfloat16": {"cuda": 9.0, "triton": 7.0,
                                                                             "torch": 8.0, "batch": 128}}}})
    assert select_backend(train, None).name == "triton"
    assert select_backend(cuda_problem(), None).name == "cuda"
    assert explain(train)["tuned"] == ["triton: 7", "torch: 8", "cuda: 9"]
    assert explain(train)["tuned_on"] == ["training step"] and explain(cuda_problem())["tuned_on"] == ["pre-projection"]
    assert tuning.backend_times("sm_90", 80, torch.bfloat16, training=True) == {"cuda": 9.0, "triton": 7.0, "torch": 8.0}


def test_measured_backend_that_cannot_run_is_skipped(table_dir, monkeypatch):
    write(table_dir, "sm_90", {"backends": {"80": {"bfloat16": {"cuda": 50.0, "triton": 90.0}}}})
    monkeypatch.setattr(get_backend("cuda"), "not_supported_reasons", lambda p: ["mocked: no module"])
    monkeypatch.setattr(get_backend("triton"), "not_supported_reasons", lambda p: [])
    assert select_backend(cuda_problem(), None).name == "triton"


def test_explicit_choice_ignores_the_table(table_dir, two_fake_fused):
    write(table_dir, "sm_90", {"backends": {"80": {"bfloat16": {"cuda": 120.0, "triton": 90.0}}}})
    assert select_backend(cuda_problem(), "cuda").name == "cuda"


def test_kernel_config_choose_validates_against_candidates(table_dir):
    space = tuning.register_space(tuning.SearchSpace(
        family="test.kernel",
        candidates=lambda C, dt, cap: [{"BLOCK": 32, "num_warps": 4}, {"BLOCK": 64, "num_warps": 8}],
        default=lambda C, dt, cap: {"BLOCK": 32, "num_warps": 4}))
    assert tuning.choose(space.family, 80, torch.float16, (9, 0)) == {"BLOCK": 32, "num_warps": 4}
    write(table_dir, "sm_90", {"kernels": {"test.kernel": {"80": {"float16": {"BLOCK": 64, "num_warps": 8,
                                                                              "time_us": 3.0}}}}})
    assert tuning.choose(space.family, 80, torch.float16, (9, 0)) == {"BLOCK": 64, "num_warps": 8}
    assert tuning.choose(space.family, 80, torch.float16, (8, 0)) == {"BLOCK": 32, "num_warps": 4}  # no sm_80 table
    # a stale entry (not a candidate any more) falls back to the default
    write(table_dir, "sm_90", {"kernels": {"test.kernel": {"80": {"float16": {"BLOCK": 128, "num_warps": 8}}}}})
    assert tuning.choose(space.family, 80, torch.float16, (9, 0)) == {"BLOCK": 32, "num_warps": 4}


def test_partial_or_malformed_tables_fall_back_to_the_default(table_dir):
    """A stale entry missing a knob (added since), an empty entry, a level that is no JSON object
    or a file that is no JSON: the default, never a crash at launch."""
    space = tuning.register_space(tuning.SearchSpace(
        family="test.kernel2",
        candidates=lambda C, dt, cap: [{"BLOCK": 32, "num_warps": 4}, {"BLOCK": 64, "num_warps": 8}],
        default=lambda C, dt, cap: {"BLOCK": 32, "num_warps": 4}))
    default = {"BLOCK": 32, "num_warps": 4}
    for entry in ({"BLOCK": 64}, {}, {"time_us": 3.0}, [64, 8], "BLOCK=64"):
        write(table_dir, "sm_90", {"kernels": {"test.kernel2": {"80": {"float16": entry}}}})
        assert tuning.choose(space.family, 80, torch.float16, (9, 0)) == default, entry
    for kernels in ([], {"test.kernel2": []}, {"test.kernel2": {"80": 5}}):
        write(table_dir, "sm_90", {"kernels": kernels, "backends": {"80": []}})
        assert tuning.choose(space.family, 80, torch.float16, (9, 0)) == default, kernels
        assert tuning.backend_times("sm_90", 80, torch.float16) == {}
    (table_dir / "sm_90.json").write_text("{not json")
    tuning.clear_cache()
    with pytest.warns(UserWarning, match="cannot be read"):
        assert tuning.choose(space.family, 80, torch.float16, (9, 0)) == default
    (table_dir / "sm_90.json").write_text("[1, 2]")
    tuning.clear_cache()
    with pytest.warns(UserWarning, match="not a JSON object"):
        assert tuning.backend_times("sm_90", 80, torch.float16) == {}
    write(table_dir, "sm_90", {"backends": {"80": {"float16": {"cuda": True, "triton": -1.0, "torch": 4.0}}}})
    assert tuning.backend_times("sm_90", 80, torch.float16) == {"torch": 4.0}
