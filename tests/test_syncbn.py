"""Upstream's SyncBatchNorm semantics across processes (issue 10, item 4).

Upstream trains with SyncBatchNorm in the aggregator: norm0..norm3 take their training-mode
batch statistics over the images of every process. Checked here on CPU with
torch.distributed (gloo): two spawned processes, each given part of a batch, against ONE
process given the whole batch (the float64 reference backend with plain BatchNorm, i.e. no
synchronisation code at all):

* outputs and input gradients (each rank's rows), every parameter gradient (the ranks'
  gradients all-reduced here: DistributedDataParallel refuses SyncBatchNorm modules on
  CPU), running statistics and num_batches_tracked after two steps (momentum 0.1 and the
  cumulative average), on every backend of the registry that trains with synchronised
  statistics; float64, an odd grid, widths 40, 80 and 200, even and uneven splits;
* the same for the fused backends, which take no float64 (`FUSED_CASES`, float32 against the
  float64 oracle on the same float32-rounded inputs): Triton through its interpreter, CUDA
  through the CPU emulation of its kernels (with the Triton statistics and backward kernels
  it trains with, `cuda/train_op.py`), in a second spawn of two processes;
* the three ways in: `torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)`, the module's
  `process_group=` and the functional API's `process_group=`, and `gmf_kernels.convert` of
  an upstream-style module made SyncBatchNorm (its BatchNorm modules are kept, shared);
* backends that cannot synchronise refuse, with the reason;
* one rank (world size 1) or no process group at all: a SyncBatchNorm layer runs exactly
  (bitwise) as plain BatchNorm.

All two-process cases run in ONE spawn (a module fixture) so that the start-up of the
processes is paid once; gloo's timeout and a join deadline turn a hang into a failure.
"""
from __future__ import annotations

import copy
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gmf_kernels
from gmf_kernels.backends import BACKEND_NAMES, get_backend
from gmf_kernels.distributed import resolve_group
from gmf_kernels.functional import make_problem, sync_groups
from gmf_kernels.numerics import random_gma_weights
import interpreter_speed
from helpers import assert_max_rel_close as assert_rel
from helpers import backend_cases, cuda_backend_on_cpu, problem

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo not available")

TOL = 1e-10
GRID = (5, 7)  # odd, non-square
GLOO_TIMEOUT_S = 60
JOIN_DEADLINE_S = 240
#: name -> (how the layer is told to synchronise, C, batch per rank, momentum)
CASES = {
    "convert_sync_batchnorm-C40": ("convert_sync_batchnorm", 40, (2, 2), 0.1),
    "functional-C200-uneven": ("functional", 200, (1, 2), 0.1),
    "module_process_group-C80-cma": ("module_process_group", 80, (2, 2), None),
    "gmf_convert-C40-uneven": ("gmf_convert", 40, (2, 1), 0.1),
    # a rank with an empty batch joins the all-reduces with a count of 0, as torch.nn.SyncBatchNorm does (it
    # raised, and the other rank waited in its all-reduce); backends that cannot join refuse (`empty_batch_joins_sync`)
    "convert_sync_batchnorm-C40-empty-rank": ("convert_sync_batchnorm", 40, (3, 0), 0.1),
}
SYNC_PROBLEM = dict(dtype=torch.float64, training=True, needs_grad=True, sync_bn=True)
#: float32 cases for the backends that synchronise but take no float64 (`fused_sync_backends`)
FUSED_CASES = {
    "convert_sync_batchnorm-C40-uneven-float32": ("convert_sync_batchnorm", 40, (2, 1), 0.1),
    "functional-C80-cma-float32": ("functional", 80, (1, 1), None),
}
FUSED_TOL = 1e-5  # float32 against float64 (training_cases.FP32_TOL)


def sync_backends():
    """Backends of the registry that run a synchronised training problem here."""
    return [n for n in BACKEND_NAMES if not get_backend(n).not_supported_reasons(problem(**SYNC_PROBLEM))]


def fused_sync_backends():
    """Backends of the registry that declare synchronised training but take no float64 (the fused
    kernels): checked in float32 on this machine through their interpreter / emulation."""
    return [n for n in BACKEND_NAMES
            if get_backend(n).supports_sync_bn and torch.float64 not in get_backend(n).dtypes]


# ------------------------------------------------------------------ building blocks
def make_module(C, momentum, seed, dtype=torch.float64):
    """A GroupMixAttention (float64 by default) with random weights and non-trivial running statistics."""
    m = gmf_kernels.GroupMixAttention(C, 8, qkv_bias=True).to(dtype)
    w = random_gma_weights(C, seed=seed)
    with torch.no_grad():
        for dst, src in zip(m.gma_weights().tensors(), w.tensors()):
            dst.copy_(src)
    for i in range(4):
        getattr(m.aggregator, f"norm{i}").momentum = momentum
    return m.train()


class EfficientAtt(nn.Module):
    """Upstream's structure and class name (what gmf_kernels.convert recognises); holds the
    submodules of a GroupMixAttention, its forward is never called."""

    def __init__(self, src: gmf_kernels.GroupMixAttention):
        super().__init__()
        self.num_heads, self.scale = src.num_heads, src.scale
        self.qkv, self.proj, self.proj_drop = src.qkv, src.proj, src.proj_drop
        self.aggregator, self.crpe = src.aggregator, src.crpe


def step(forward, module, x1, x2, lw):
    """Train step 1 (forward + backward of sum(out * lw)), then step 2 (forward only): returns
    out1, input grad, parameter grads, out2 and the BatchNorm buffers after both steps."""
    x = x1.clone().requires_grad_(True)
    out1 = forward(x)
    (out1 * lw).sum().backward()
    with torch.no_grad():
        out2 = forward(x2)
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    return dict(out1=out1.detach(), x_grad=x.grad.clone(), grads=grads, out2=out2, buffers=buffers)


def double_step(forward, module, x1, lw):
    """One step of a gradient-penalty loss, sum(out * lw) + sum(d sum(out * lw) / dx ^ 2) (a gradient of a
    gradient: create_graph=True): the input gradient and the parameter gradients."""
    x = x1.clone().requires_grad_(True)
    loss = (forward(x) * lw).sum()
    g, = torch.autograd.grad(loss, x, create_graph=True)
    (loss + g.square().sum()).backward()
    return dict(x_grad=x.grad.clone(), grads={n: p.grad.clone() for n, p in module.named_parameters()})


def oracle(sd, C, momentum, x1, x2, lw):
    """ONE process, the whole batch, the reference backend with plain BatchNorm."""
    m = make_module(C, momentum, seed=0)
    m.load_state_dict(sd)
    m.set_backend("reference")
    return step(lambda x: m(x, GRID), m, x1, x2, lw)


# ------------------------------------------------------------------ the two-process worker
def _sync_module(api, sd, C, momentum, backend, dtype=torch.float64):
    """(the module whose parameters are trained, forward) for one way of asking for sync."""
    m = make_module(C, momentum, seed=0, dtype=dtype)
    m.load_state_dict(sd)
    m.set_backend(backend)
    world = dist.group.WORLD
    if api == "convert_sync_batchnorm":
        holder = nn.ModuleDict({"att": m})  # GroupMixAttention inside a model, converted as a whole
        holder = nn.SyncBatchNorm.convert_sync_batchnorm(holder)
        att = holder["att"]
        assert all(isinstance(getattr(att.aggregator, f"norm{i}"), nn.SyncBatchNorm) for i in range(4))
        assert set(att.state_dict()) == set(sd)
        return att, lambda x: att(x, GRID)
    if api == "module_process_group":
        att = gmf_kernels.GroupMixAttention(C, 8, qkv_bias=True, process_group=world).to(dtype).train()
        att.load_state_dict(sd)
        for i in range(4):
            getattr(att.aggregator, f"norm{i}").momentum = momentum
        att.set_backend(backend)
        assert not any(isinstance(mod, nn.SyncBatchNorm) for mod in att.modules())
        assert copy.deepcopy(att).process_group is world  # a copy (e.g. an EMA model) shares the group
        return att, lambda x: att(x, GRID)
    if api == "functional":
        return m, lambda x: gmf_kernels.group_mix_attention(
            x, GRID, m.gma_weights(), num_heads=8, scale=m.scale, training=True, bn_momentum=momentum,
            backend=backend, process_group=world)
    if api == "gmf_convert":
        upstream = nn.SyncBatchNorm.convert_sync_batchnorm(EfficientAtt(m))
        norms = [getattr(upstream.aggregator, f"norm{i}") for i in range(4)]
        att = gmf_kernels.convert(upstream, backend=backend)
        assert isinstance(att, gmf_kernels.GroupMixAttention)
        assert [getattr(att.aggregator, f"norm{i}") for i in range(4)] == norms  # kept, shared
        assert all(type(n) is nn.SyncBatchNorm for n in norms)
        return att, lambda x: att(x, GRID)
    raise AssertionError(api)


def _cuda_on_cpu(emulation_path):
    """In a worker: the cuda backend runs CPU tensors through the emulation build (as
    tests/test_cuda_training.py's fixture does in the test process)."""
    import gmf_kernels.cuda as gcuda
    gcuda._loaded = gcuda.load_from(emulation_path)
    cuda_backend_on_cpu()


def _worker(rank, world_size, port, inputs_path, out_dir, backends, cases=None, dtype=torch.float64,
            emulation_path=None):
    torch.set_num_threads(1)
    if interpreter_speed.wanted():
        interpreter_speed.install()   # as conftest.py does in the test process
    cases = CASES if cases is None else cases
    if emulation_path is not None:
        _cuda_on_cpu(emulation_path)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    try:
        inputs = torch.load(inputs_path, weights_only=False)
        results = {}
        for case, (api, C, split, momentum) in cases.items():
            data = inputs[case]
            lo = sum(split[:rank])
            rows = slice(lo, lo + split[rank])
            x1, x2, lw = (data[k][rows].to(dtype) for k in ("x1", "x2", "lw"))
            for backend in backends:
                module, forward = _sync_module(api, data["sd"], C, momentum, backend, dtype)
                res = step(forward, module, x1, x2, lw)
                for g in res["grads"].values():  # what DistributedDataParallel would do (as a sum)
                    dist.all_reduce(g)
                results[(backend, case)] = res
        if cases is CASES:
            # a gradient of a gradient through the synchronised statistics (backends that declare double
            # backward), and the torch backend under torch.compile(fullgraph=True) (aot_eager: no C++ build)
            case = "convert_sync_batchnorm-C40"
            api, C, split, momentum = cases[case]
            data = inputs[case]
            lo = sum(split[:rank])
            x1, x2, lw = (data[k][lo:lo + split[rank]].to(dtype) for k in ("x1", "x2", "lw"))
            for backend in backends:
                if get_backend(backend).supports_double_backward:
                    module, forward = _sync_module(api, data["sd"], C, momentum, backend, dtype)
                    res = double_step(forward, module, x1, lw)
                    for g in res["grads"].values():
                        dist.all_reduce(g)
                    results[("double", backend)] = res
            module, _ = _sync_module(api, data["sd"], C, momentum, "torch", dtype)
            compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
            res = step(lambda x: compiled(x, GRID), module, x1, x2, lw)
            for g in res["grads"].values():
                dist.all_reduce(g)
            results[("compile", "torch")] = res
        # backends that cannot synchronise refuse, with the reason (never a silent per-process BN)
        refusals = {}
        for backend in BACKEND_NAMES:
            if cases is not CASES or backend in backends or get_backend(backend).availability_reasons():
                continue
            module, forward = _sync_module("convert_sync_batchnorm", inputs[next(iter(CASES))]["sd"], 40, 0.1,
                                           backend)
            try:
                forward(inputs[next(iter(CASES))]["x1"][:1])
                refusals[backend] = "ran"
            except ValueError as e:
                refusals[backend] = str(e)
        torch.save({"results": results, "refusals": refusals}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, nprocs, args):
    """Start nprocs processes (spawn) and wait for them; kill them and fail after a deadline."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_DEADLINE_S
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{nprocs} processes did not finish within {JOIN_DEADLINE_S} s (hang?)")


def make_inputs(cases, dtype=torch.float64):
    """Per case: a state_dict, the two steps' inputs and the loss weights, float64 values
    representable in `dtype` (the float64 oracle then sees exactly what a `dtype` run sees)."""
    gen = torch.Generator().manual_seed(11)
    inputs = {}
    for k, (case, (api, C, split, momentum)) in enumerate(cases.items()):
        B = sum(split)
        N = GRID[0] * GRID[1]
        sd = {n: t.to(dtype).to(t.dtype) if t.is_floating_point() else t.clone()
              for n, t in make_module(C, momentum, seed=100 + k).state_dict().items()}
        x1 = torch.randn(B, N, C, generator=gen, dtype=torch.float64) + 0.3  # BN inputs with a mean
        x2 = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
        lw = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
        inputs[case] = {**dict(sd=sd), **{n: t.to(dtype).double() for n, t in dict(x1=x1, x2=x2, lw=lw).items()}}
    return inputs


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("syncbn")
    inputs = make_inputs(CASES)
    torch.save(inputs, tmp / "inputs.pt")
    backends = sync_backends()
    spawn(_worker, 2, (2, _free_port(), str(tmp / "inputs.pt"), str(tmp), backends))
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return dict(inputs=inputs, ranks=ranks, backends=backends)


@pytest.fixture(scope="module")
def fused_two_process_run(tmp_path_factory, emu_build):
    """The fused backends in float32, two processes, ONE spawn: Triton through the interpreter
    (conftest.py sets TRITON_INTERPRET=1; the spawned processes inherit it), CUDA through the
    session's emulation build."""
    from gmf_kernels.backends.triton_backend import _interpreting
    if not _interpreting():
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1")
    tmp = tmp_path_factory.mktemp("syncbn_fused")
    inputs = make_inputs(FUSED_CASES, torch.float32)
    torch.save(inputs, tmp / "inputs.pt")
    backends = fused_sync_backends()
    spawn(_worker, 2, (2, _free_port(), str(tmp / "inputs.pt"), str(tmp), backends, FUSED_CASES, torch.float32,
                       str(emu_build[0])))
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return dict(inputs=inputs, ranks=ranks, backends=backends)


# ------------------------------------------------------------------ two processes vs one
def check_two_processes(run, backend, case, cases, tol):
    """Each rank's rows of the outputs and input gradient, every (all-reduced) parameter gradient,
    the buffers after two steps: as ONE float64 process on the whole batch."""
    api, C, split, momentum = cases[case]
    data = run["inputs"][case]
    exp = oracle(data["sd"], C, momentum, data["x1"], data["x2"], data["lw"])
    lo = 0
    for rank in range(2):
        got = run["ranks"][rank]["results"][(backend, case)]
        rows = slice(lo, lo + split[rank])
        lo += split[rank]
        who = f"{backend} {case} rank {rank}"
        for name, what in (("out1", "out"), ("x_grad", "input grad"), ("out2", "out (step 2)")):
            assert got[name].shape == exp[name][rows].shape, f"{who} {what}: shape"
            if split[rank]:
                assert_rel(got[name].double(), exp[name][rows], tol, f"{who} {what}")
        assert set(got["grads"]) == set(exp["grads"])
        for n, g in exp["grads"].items():
            assert_rel(got["grads"][n].double(), g, tol, f"{who} grad {n}")
        assert set(got["buffers"]) == set(exp["buffers"])
        for n, b in exp["buffers"].items():
            if n.endswith("num_batches_tracked"):
                assert int(got["buffers"][n]) == int(b) == 2, f"{who} {n}"
            else:
                assert_rel(got["buffers"][n].double(), b, tol, f"{who} {n}")
    # per-process statistics would differ: the check above can tell (a sanity check of the test)
    if 0 in split:   # (the other rank's batch is the whole batch)
        return
    rank0 = run["ranks"][0]["results"][(backend, case)]
    local = oracle(data["sd"], C, momentum, data["x1"][:split[0]], data["x2"][:split[0]], data["lw"][:split[0]])
    err = (local["buffers"]["aggregator.norm1.running_mean"] - rank0["buffers"]["aggregator.norm1.running_mean"])
    assert err.abs().max() > 1e3 * tol * rank0["buffers"]["aggregator.norm1.running_mean"].abs().max()


@pytest.mark.parametrize("backend, case", backend_cases(BACKEND_NAMES, list(CASES), list(CASES), **SYNC_PROBLEM))
def test_two_processes_match_one_process_on_the_whole_batch(two_process_run, backend, case):
    check_two_processes(two_process_run, backend, case, CASES, TOL)


@pytest.mark.parametrize("backend", fused_sync_backends())
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_backends_two_processes_float32(fused_two_process_run, backend, case):
    """The fused backends' SyncBatchNorm (statistics all-reduced in the statistics pass, the two
    gradient sums in the backward), float32 through the interpreter / emulation."""
    check_two_processes(fused_two_process_run, backend, case, FUSED_CASES, FUSED_TOL)


@pytest.mark.parametrize("backend", [n for n in BACKEND_NAMES if get_backend(n).supports_double_backward])
def test_double_backward_through_synchronised_statistics(two_process_run, backend):
    """A gradient-penalty loss (create_graph=True) on two processes: the input and parameter gradients of one
    process on the whole batch. (The backward's all-reduce was not recorded: the second-order graph took the
    sum over the ranks for the identity, 1-10 % off, silently.)"""
    if backend not in two_process_run["backends"]:
        pytest.skip(f"{backend} does not train with synchronised statistics here")
    case = "convert_sync_batchnorm-C40"
    api, C, split, momentum = CASES[case]
    data = two_process_run["inputs"][case]
    m = make_module(C, momentum, seed=0)
    m.load_state_dict(data["sd"])
    m.set_backend("reference")
    exp = double_step(lambda x: m(x, GRID), m, data["x1"], data["lw"])
    lo = 0
    for rank in range(2):
        got = two_process_run["ranks"][rank]["results"][("double", backend)]
        rows = slice(lo, lo + split[rank])
        lo += split[rank]
        assert_rel(got["x_grad"], exp["x_grad"][rows], TOL, f"{backend} rank {rank}: input grad")
        for n, g in exp["grads"].items():
            assert_rel(got["grads"][n], g, TOL, f"{backend} rank {rank}: grad {n}")


def test_compile_fullgraph_with_synchronised_statistics(two_process_run):
    """torch.compile(fullgraph=True) of a SyncBatchNorm-converted layer (torch backend) on two processes: the
    all-reduces traced as functional collectives; one process's results on the whole batch. (Dynamo could
    not trace the in-place dist.all_reduce, nor math.prod over a generator.)"""
    case = "convert_sync_batchnorm-C40"
    api, C, split, momentum = CASES[case]
    data = two_process_run["inputs"][case]
    exp = oracle(data["sd"], C, momentum, data["x1"], data["x2"], data["lw"])
    lo = 0
    for rank in range(2):
        got = two_process_run["ranks"][rank]["results"][("compile", "torch")]
        rows = slice(lo, lo + split[rank])
        lo += split[rank]
        for key in ("out1", "x_grad", "out2"):
            assert_rel(got[key], exp[key][rows], TOL, f"compiled rank {rank}: {key}")
        for n, g in exp["grads"].items():
            assert_rel(got["grads"][n], g, TOL, f"compiled rank {rank}: grad {n}")
        for n, b in exp["buffers"].items():
            if not n.endswith("num_batches_tracked"):
                assert_rel(got["buffers"][n], b, TOL, f"compiled rank {rank}: {n}")


def test_synchronised_variance_keeps_float32_accuracy(monkeypatch):
    """sync_batch_stats on float32 channels with a large mean (1000, std 1): the variance as accurate as
    torch.var_mean's (the all-reduce replaced by the identity: one rank). Squares of float32 values summed
    lost 2.5e-3 of it."""
    import gmf_kernels.distributed as gd
    monkeypatch.setattr(gd, "_sum_over_ranks", lambda t, group: t.detach().clone())
    x = torch.randn(4, 36, 3, 8, generator=torch.Generator().manual_seed(2)) + 1000.0
    mean, var, count = gd.sync_batch_stats(x, (0, 1, 2), group=None)
    exact = x.double().var(dim=(0, 1, 2), unbiased=False)
    assert int(count) == 4 * 36 * 3
    assert float(((var - exact) / exact).abs().max()) < 1e-6
    torch.testing.assert_close(mean, x.double().mean(dim=(0, 1, 2)), rtol=1e-12, atol=0)


def test_backends_that_cannot_sync_refuse(two_process_run):
    assert set(two_process_run["backends"]) >= {"torch", "reference"}
    for backend in BACKEND_NAMES:
        declared = get_backend(backend).supports_sync_bn
        reasons = get_backend(backend).not_supported_reasons(problem(**SYNC_PROBLEM))
        assert declared or any("synchronised across processes" in r for r in reasons), (backend, reasons)
        if declared or backend in two_process_run["backends"] or get_backend(backend).availability_reasons():
            continue  # (a backend that cannot run here at all is refused by set_backend already)
        for rank in range(2):
            msg = two_process_run["ranks"][rank]["refusals"][backend]
            assert "synchronised across processes" in msg, f"{backend} rank {rank}: {msg}"


# ------------------------------------------------------------------ one process / one rank
def _bitwise_same(a, b, what):
    assert torch.equal(a["out1"], b["out1"]) and torch.equal(a["x_grad"], b["x_grad"]), what
    assert torch.equal(a["out2"], b["out2"]), what
    for n in a["grads"]:
        assert torch.equal(a["grads"][n], b["grads"][n]), f"{what}: grad {n}"
    for n in a["buffers"]:
        assert torch.equal(a["buffers"][n], b["buffers"][n]), f"{what}: {n}"


def _one_process_checks(backend):
    """SyncBatchNorm modules / process_group= in a single process run exactly as plain BatchNorm."""
    C, momentum = 40, 0.1
    sd = make_module(C, momentum, seed=5).state_dict()
    gen = torch.Generator().manual_seed(3)
    x1, x2, lw = (torch.randn(3, GRID[0] * GRID[1], C, generator=gen, dtype=torch.float64) for _ in range(3))
    plain = make_module(C, momentum, seed=0)
    plain.load_state_dict(sd)
    plain.set_backend(backend)
    exp = step(lambda x: plain(x, GRID), plain, x1, x2, lw)
    apis = ["convert_sync_batchnorm"]
    if dist.is_initialized():  # an explicit group exists only once torch.distributed is initialised
        apis += ["functional", "module_process_group"]
    for api in apis:
        module, forward = _sync_module(api, sd, C, momentum, backend)
        _bitwise_same(step(forward, module, x1, x2, lw), exp, f"{backend} {api}")
        hp = module.train().hyper()
        assert sync_groups(hp.bn_process_group, True) is None, api
        assert not make_problem(x1, GRID, module.gma_weights(),
                                hp._replace(bn_process_group=sync_groups(hp.bn_process_group, True)), True).sync_bn


@pytest.mark.parametrize("backend", [pytest.param(n, id=n) for n in ("torch", "reference")])
def test_without_process_group_syncbatchnorm_is_batchnorm(backend):
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    assert resolve_group(object()) is None  # nothing to synchronise without torch.distributed
    _one_process_checks(backend)


def test_world_size_one_is_batchnorm():
    """An initialised group of one rank: SyncBatchNorm, process_group= (module and functional)
    all run the plain BatchNorm path, bitwise."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    try:
        assert resolve_group(dist.group.WORLD) is None
        for backend in ("torch", "reference"):
            _one_process_checks(backend)
    finally:
        dist.destroy_process_group()


def test_convert_keeps_syncbatchnorm_modules():
    """gmf_kernels.convert keeps (shares) the BatchNorm modules of the upstream module: the
    SyncBatchNorms of a convert_sync_batchnorm model stay, with their process group."""
    m = make_module(40, 0.1, seed=7)
    upstream = nn.SyncBatchNorm.convert_sync_batchnorm(EfficientAtt(copy.deepcopy(m)))
    upstream.aggregator.norm3.eval()  # a frozen BatchNorm keeps its own mode
    before = [getattr(upstream.aggregator, f"norm{i}") for i in range(4)]
    params = dict(upstream.named_parameters())
    att = gmf_kernels.convert(upstream, backend="reference")
    assert [getattr(att.aggregator, f"norm{i}") for i in range(4)] == before
    assert all(type(n) is nn.SyncBatchNorm for n in before)
    assert att.training and not att.aggregator.norm3.training and att.aggregator.norm2.training
    assert all(p is params[k] for k, p in att.named_parameters())
    x = torch.randn(2, GRID[0] * GRID[1], 40, dtype=torch.float64)
    m.aggregator.norm3.eval()
    m.set_backend("reference")
    assert torch.equal(att(x, GRID), m(x, GRID))
