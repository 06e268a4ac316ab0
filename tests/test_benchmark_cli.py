"""Smoke test of benchmarks/throughput.py: tiny runs end to end, the settings logic, and the
--upstream loader (benchmarks/upstream.py) against a fake upstream clone written here."""
import contextlib
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

from helpers import randomize_bn_stats_

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "throughput.py"
#: a module no Python environment has: the fake upstream's missing dependency
MISSING_DEP = "gmf_test_missing_dependency"


def _load_script():
    spec = importlib.util.spec_from_file_location("gmf_benchmark_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_script(*args):
    """The script in a subprocess on the CPU, one thread; -> the finished process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # one thread: on a shared, oversubscribed CPU, OpenMP threads can make tiny ops 10x slower
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, str(SCRIPT), "--model", "groupmixformer_m", "--img-size", "64", "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:
        return False


def fake_upstream(root: Path, imports: str = "import ipdb", extra: str = "") -> Path:
    """A clone of AILab-CVC/GroupMixFormer as far as the loader sees it: models/groupmixformer.py
    defining GroupMixFormer with upstream's constructor keywords, delegating to gmf_kernels'
    reference model, with upstream's SyncBatchNorm as norm4; `imports` at the top of the file
    (upstream's unused `import ipdb` by default), `extra` appended to the constructor."""
    (root / "models").mkdir(parents=True)
    (root / "models" / "groupmixformer.py").write_text(textwrap.dedent('''\
        {imports}
        import torch
        from torch import nn
        from gmf_kernels.models.groupmixformer import GroupMixFormer as _Ours


        class GroupMixFormer(_Ours):
            def __init__(self, patch_size=4, in_dim=3, num_stages=4, num_classes=1000,
                         embedding_dims=[80, 160, 320, 320], serial_depths=[2, 4, 12, 4], num_heads=8,
                         mlp_ratios=[4, 4, 4, 4], qkv_bias=True, qk_scale=None, drop_rate=0.0,
                         attn_drop_rate=0.0, drop_path_rate=0.2, norm_layer=None, return_interm_layers=False,
                         out_features=None, pretrained=False):
                super().__init__(embedding_dims=embedding_dims, serial_depths=serial_depths,
                                 mlp_ratios=mlp_ratios, num_heads=num_heads, qkv_bias=qkv_bias,
                                 num_classes=num_classes, drop_path_rate=drop_path_rate,
                                 return_interm_layers=return_interm_layers, qk_scale=qk_scale,
                                 drop_rate=drop_rate, in_chans=in_dim, backend="reference")
                self.norm4 = nn.SyncBatchNorm(embedding_dims[3])
                self.upstream_kwargs = dict(embedding_dims=embedding_dims, serial_depths=serial_depths,
                                            mlp_ratios=mlp_ratios, num_heads=num_heads, qkv_bias=qkv_bias)
                {extra}
        ''').format(imports=imports, extra=extra))
    return root


def test_cli_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run_script("--batch-size", "1", "--num-warm-iter", "1", "--num-bench-iter", "1",
                       "--backends", "torch,reference", "--results-file", str(out), "--optimized-auto-unverified")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reference" in proc.stdout and "summary" in proc.stdout

    data = json.loads(out.read_text())
    assert set(data) == {"meta", "rows"}
    meta = data["meta"]
    for key in ("device_name", "torch", "triton", "gmf_kernels", "git_sha", "date", "settings"):
        assert key in meta, key
    rows = {r["backend"]: r for r in data["rows"] if r["kind"] == "gmf" and r.get("status") == "ok"}
    assert set(rows) == {"torch", "reference"}, data["rows"]
    for name, r in rows.items():
        assert r["model"] == "groupmixformer_m"
        assert r["img_per_s"] > 0 and r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"]
        assert r["n_timed"] == 1
        err = r["max_rel_err_vs_reference"]
        assert err is not None and math.isfinite(err)
        assert r["ratio_vs_reference"] > 0
    assert rows["reference"]["max_rel_err_vs_reference"] == 0.0
    assert rows["reference"]["ratio_vs_reference"] == 1.0
    assert rows["torch"]["check"] == "ok", rows["torch"]
    assert rows["torch"]["max_rel_err_vs_reference"] < 1e-3
    assert meta["bench"] == "inference" and all(r["bench"] == "inference" for r in rows.values())
    # the backend each width's GMA layers took in the row's first call (groupmixformer_m: 40, 80, 160)
    for name, r in rows.items():
        assert r["gma_backends"] == {"40": name, "80": name, "160": name}, r
    assert meta["settings"]["optimized_auto_unverified"] is True


def _cannot_train_backends():
    """Available backends that declare they cannot train (their rows must say so under 'not run')."""
    from gmf_kernels.backends import BACKEND_NAMES, get_backend
    return [n for n in BACKEND_NAMES
            if not get_backend(n).availability_reasons() and not get_backend(n).supports_training]


def test_cli_train_smoke(tmp_path):
    """--bench train: one training step per row end to end (SGD), first-step check against reference;
    with --upstream, upstream's model (a fake clone whose norm4 is a SyncBatchNorm: in one process it
    must train as BatchNorm) trains from the same weights and passes the same check."""
    out = tmp_path / "train.json"
    refusing = _cannot_train_backends()
    clone = fake_upstream(tmp_path / "clone")
    proc = _run_script("--bench", "train", "--batch-size", "2", "--num-warm-iter", "0", "--num-bench-iter", "1",
                       "--backends", ",".join(["torch", "reference"] + refusing), "--no-timm",
                       "--upstream", str(clone), "--results-file", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train: forward + backward + SGD" in proc.stdout and "summary" in proc.stdout
    assert "peak memory is not measured on CPU" in proc.stdout

    data = json.loads(out.read_text())
    assert data["meta"]["bench"] == "train" and data["meta"]["settings"]["opt"] == "sgd"
    assert "train_step_definition" in data["meta"]
    rows = {r["backend"]: r for r in data["rows"] if r["kind"] == "gmf"}
    for name in ("torch", "reference"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["bench"] == "train" and r["opt"] == "sgd" and r["n_timed"] == 1 and r["img_per_s"] > 0
        assert math.isfinite(r["first_step_loss"])
        errs = r["first_step_err_vs_reference"]
        assert "loss" in errs and sum(k.startswith("grad:") for k in errs) >= 5 and any(
            k.startswith("buffer:") for k in errs)
        assert r["peak_mem_mib"] is None and "not measured" in r["peak_mem_note"]
    assert rows["reference"]["max_rel_err_vs_reference"] == 0.0 and rows["reference"]["check"] == "is reference"
    assert rows["torch"]["check"] == "ok", rows["torch"]
    assert rows["torch"]["max_rel_err_vs_reference"] < 1e-3
    assert abs(rows["torch"]["first_step_loss"] - rows["reference"]["first_step_loss"]) < 1e-4
    assert rows["torch"]["ratio_vs_reference"] > 0
    up = next(r for r in data["rows"] if r["kind"] == "upstream")
    assert up["status"] == "ok" and up["check"] == "ok", up
    assert abs(up["first_step_loss"] - rows["reference"]["first_step_loss"]) < 1e-4
    assert up["first_step_err_vs_reference"]["buffer:aggregator.norm2.running_var"] < 1e-5
    assert any("SyncBatchNorm layers run as BatchNorm" in n for n in up["upstream_notes"])
    assert up["ratio_vs_upstream"] == 1.0 and rows["torch"]["ratio_vs_upstream"] > 0
    for name in refusing:  # listed under "not run", with the backend's own reasons
        assert rows[name]["status"] == "unsupported" and "cannot train" in rows[name]["reason"], rows[name]
        assert "training mode not supported" in rows[name]["reason"]
    if refusing:
        assert "not run:" in proc.stdout and "cannot train" in proc.stdout


def test_settings_and_parsing():
    bench = _load_script()
    parser = bench.build_parser()
    # the paper protocol, and an explicit flag that overrides it (recorded)
    s = bench.resolve_settings(parser.parse_args(["--protocol", "paper", "--device", "cpu"]))
    assert (s["batch_size"], s["img_size"], s["num_warm_iter"], s["num_bench_iter"], s["precision"]) == \
        (128, 224, 50, 30, "fp32")
    assert s["protocol"] == "paper" and s["schedule"] == "block"     # upstream's, on a CPU too
    s = bench.resolve_settings(parser.parse_args(["--protocol", "paper", "--device", "cpu", "-b", "16"]))
    assert s["batch_size"] == 16 and "modified" in s["protocol"]
    s = bench.resolve_settings(parser.parse_args(["--protocol", "paper", "--device", "cpu", "--schedule",
                                                  "interleave"]))
    assert s["schedule"] == "interleave" and "modified: schedule=interleave" in s["protocol"]
    # CPU defaults: small, no torch.compile, no fp64 oracle for fp32
    s = bench.resolve_settings(parser.parse_args(["--device", "cpu"]))
    assert s["batch_size"] == 8 and s["img_size"] == 224 and s["torchcompile"] is None
    assert s["fp64_check"] is False and s["schedule"] == "interleave"
    assert bench.resolve_settings(parser.parse_args(["--device", "cpu", "--precision", "bf16"]))["fp64_check"]
    assert s["bench"] == "inference" and "opt" not in s
    # --bench train: optimizer and its default learning rate; the paper protocol is inference only
    s = bench.resolve_settings(parser.parse_args(["--device", "cpu", "--bench", "train", "--opt", "adamw"]))
    assert s["bench"] == "train" and s["opt"] == "adamw" and s["lr"] == bench.DEFAULT_LR["adamw"]
    assert s["drop_path_rate"] == 0.0
    with pytest.raises(SystemExit):
        bench.resolve_settings(parser.parse_args(["--device", "cpu", "--bench", "train", "--protocol", "paper"]))
    assert bench.worst([0.1, float("nan"), 0.2]) != bench.worst([0.1, float("nan"), 0.2])  # NaN wins
    assert bench.parse_models("t,tiny,groupmixformer_small") == ["groupmixformer_t", "groupmixformer_s"]
    assert bench.parse_backends("torch, reference") == ["torch", "reference"]
    assert bench.parse_backends(None) is None
    backends, skipped = bench.select_backends(["torch"], "cpu")
    assert backends == ["torch", "reference"]  # reference always runs
    stats = bench.stats([3.0, 1.0, 2.0], batch=4, total_s=0.006)
    assert stats["median_ms"] == 2.0 and stats["min_ms"] == 1.0 and stats["img_per_s"] == 2000.0
    assert abs(stats["img_per_s_total"] - 2000.0) < 1e-9


def test_optimized_auto_unverified(monkeypatch):
    """--optimized-auto-unverified sets GMF_AUTO_UNVERIFIED=1 for the run (what the optimized row's `auto` reads),
    and the optimized row records it; without the flag the environment is left as it is."""
    import gmf_kernels
    bench = _load_script()
    parser = bench.build_parser()
    monkeypatch.setenv("GMF_AUTO_UNVERIFIED", "0")      # so that the test's end restores the environment
    monkeypatch.delenv("GMF_AUTO_UNVERIFIED")
    bench.apply_auto_unverified(bench.resolve_settings(parser.parse_args(["--device", "cpu"])))
    assert "GMF_AUTO_UNVERIFIED" not in os.environ
    s = bench.resolve_settings(parser.parse_args(["--device", "cpu", "--optimized-auto-unverified"]))
    bench.apply_auto_unverified(s)
    assert os.environ["GMF_AUTO_UNVERIFIED"] == "1"
    ctx = types.SimpleNamespace(settings=dict(s, compile_only=False), B=1)
    model = gmf_kernels.create_model("tiny").eval()
    r = bench.optimized_runner(ctx, "tiny", model)       # torch.compile is lazy: nothing compiles here
    assert r.alive and r.row["auto_unverified"] is True, r.row


def test_new_flags_parsing():
    """--bench infer (timm's name), --compare (default: the Swin-T row; '' or --no-timm: none),
    --upstream and --plot as settings."""
    bench = _load_script()
    parser = bench.build_parser()

    def settings(*argv):
        return bench.resolve_settings(parser.parse_args(["--device", "cpu", *argv]))

    assert settings("--bench", "infer")["bench"] == "inference"
    assert settings("--bench", "inference")["bench"] == "inference" and settings("--bench", "train")["bench"] == "train"
    with pytest.raises(SystemExit):
        parser.parse_args(["--bench", "training"])
    assert settings()["compare"] == [bench.TIMM_BASELINE]
    assert settings("--compare", "")["compare"] == [] and settings("--no-timm")["compare"] == []
    assert settings("--no-timm", "--compare", "coat_lite_small")["compare"] == []
    assert settings("--compare", "swin_tiny_patch4_window7_224, coat_lite_small,coat_lite_small")["compare"] == \
        ["swin_tiny_patch4_window7_224", "coat_lite_small"]
    assert settings()["upstream"] is None and settings("--upstream", "/x/y")["upstream"] == "/x/y"
    assert parser.parse_args(["--plot", "a.png"]).plot == "a.png"


@pytest.mark.parametrize("n_models", [1, 3])
@pytest.mark.parametrize("device_type, compile_backend, optimized, expected", [
    ("cpu", "inductor", False, ["torch+compile"]),
    ("cuda", "inductor", True, ["torch+compile", "reference+compile", "optimized"]),
    ("cpu", None, False, []),
])
def test_compile_warning(capsys, n_models, device_type, compile_backend, optimized, expected):
    """One warning on stderr naming the rows that compile, none when nothing compiles."""
    bench = _load_script()
    ctx = types.SimpleNamespace(dev_type=device_type, settings=dict(torchcompile=compile_backend,
                                                                    compile_backends=None, optimized=optimized))
    bench.warn_compile(ctx, ["torch", "reference"], n_models)
    err = capsys.readouterr().err
    if not expected:
        assert err == ""
        return
    assert err.count("warning:") == 1 and f"compiling {len(expected)} row" in err
    assert all(name in err for name in expected) and ("on CPU" in err) == (device_type == "cpu")
    assert (f"each of {n_models} models" in err) == (n_models > 1)


@pytest.mark.parametrize("device_type, named, upstream, expected", [
    ("cuda", None, True, ["torch", "reference"]),  # upstream only when named
    ("cuda", "torch,upstream", True, ["torch", "upstream"]),
    ("cpu", "upstream", True, ["upstream"]),
    ("cpu", None, True, ["torch"]),
    ("cuda", "cuda,upstream,reference", True, ["upstream", "reference"]),  # what the run lacks is dropped
])
def test_compile_backends_upstream(capsys, device_type, named, upstream, expected):
    """`upstream` in --compile-backends adds the 'upstream+compile' row (named only, with --upstream);
    it is among the rows the compile warning names; without --upstream the flag is refused."""
    bench = _load_script()
    parser = bench.build_parser()
    argv = ["--device", "cpu", "--torchcompile", "eager"] + (["--compile-backends", named] if named else [])
    settings = bench.resolve_settings(parser.parse_args(argv + (["--upstream", "/x/clone"] if upstream else [])))
    ctx = types.SimpleNamespace(dev_type=device_type, settings=dict(settings, optimized=False))
    assert bench.compile_backends(ctx, ["torch", "reference"]) == expected
    bench.warn_compile(ctx, ["torch", "reference"], 1)
    assert ("upstream+compile" in capsys.readouterr().err) == ("upstream" in expected)
    if named and "upstream" in named:
        with pytest.raises(SystemExit, match="needs --upstream PATH"):
            bench.resolve_settings(parser.parse_args(argv))


@pytest.mark.parametrize("upstream_precision, model_dtype, autocast_dtype", [
    (None, torch.float32, None),  # 'same': the run's fp32, the run's context
    ("amp", torch.float32, torch.bfloat16),  # amp on CPU: bf16 autocast over fp32 weights and input
])
def test_upstream_compiled_train_row(tmp_path, upstream_precision, model_dtype, autocast_dtype):
    """--bench train: 'upstream+compile' trains its own torch.compile'd copy of upstream's model,
    from the same initial weights as the upstream row, with its own optimizer (built, not run:
    the end-to-end compiled row is the inference test's). --upstream-precision gives both upstream
    rows their own context (dtypes, autocast, input, tolerance; their labels and rows say it) and
    leaves the run's as it was."""
    bench = _load_script()
    clone = fake_upstream(tmp_path / "clone")
    argv = ["--device", "cpu", "--bench", "train", "--batch-size", "1", "--img-size", "64", "--upstream", str(clone),
            "--torchcompile", "eager", "--compile-backends", "torch,upstream"]
    argv += ["--upstream-precision", upstream_precision] if upstream_precision else []
    ctx = bench.Context(bench.resolve_settings(bench.build_parser().parse_args(argv)), bench.Progress(quiet=True))
    import gmf_kernels as gmf
    ours = gmf.create_model("groupmixformer_m", backend="reference")
    randomize_bn_stats_(ours, seed=int(torch.randint(0, 2 ** 31, ())))
    ctx.target = torch.randint(0, ours.num_classes, (1,))  # as benchmark_model_train sets it
    eager, compiled = bench.upstream_runners(ctx, "groupmixformer_m", ours.state_dict(), ["torch"], train=True)
    assert (eager.backend, compiled.backend) == ("upstream", "upstream+compile")
    own = upstream_precision or "fp32"
    suffix = f"{own}, eager" if upstream_precision else "eager"
    assert compiled.kind == "upstream" and compiled.alive and compiled.label == f"upstream+compile ({suffix})"
    assert compiled.row["label"] == compiled.label and eager.label == (f"upstream ({own})" if upstream_precision
                                                                       else f"upstream ({clone})")
    assert compiled.row["upstream_file"] == eager.row["upstream_file"]
    assert eager.row["precision"] == compiled.row["precision"] == own
    # the run's context is untouched; the upstream rows share theirs
    assert ctx.precision == "fp32" and ctx.x.dtype == torch.float32 and ctx.autocast_dtype is None
    uctx = bench.row_ctx(ctx, eager)
    assert (uctx is ctx) == (upstream_precision is None) and bench.row_ctx(ctx, compiled) is uctx
    assert compiled.step.ctx is uctx and eager.step.ctx is uctx
    assert (uctx.model_dtype, uctx.autocast_dtype, uctx.x.dtype) == (model_dtype, autocast_dtype, model_dtype)
    assert torch.equal(uctx.x.float(), ctx.x32.to(model_dtype).float()) and uctx.target is ctx.target
    assert uctx.tol == bench.tolerance(autocast_dtype or model_dtype, "cpu")
    model = compiled.module._orig_mod  # torch.compile's wrapper around a copy
    assert model is not eager.module and model.training and isinstance(model.norm4, torch.nn.SyncBatchNorm)
    assert all(q.dtype == model_dtype for q in model.parameters())
    for k, v in ours.state_dict().items():
        got = model.state_dict()[k]
        assert torch.equal(got, v.to(got.dtype)), k
    assert compiled.step is not None and compiled.step.model is compiled.module
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for g in compiled.step.opt.param_groups for p in g["params"])


@pytest.mark.parametrize("argv, expected", [
    ([], None),  # no upstream rows, no precision of theirs
    (["--upstream", "/c"], "fp32"),  # same as --precision
    (["--upstream", "/c", "--precision", "bf16", "--upstream-precision", "same"], "bf16"),
    (["--upstream", "/c", "--precision", "bf16", "--upstream-precision", "amp"], "amp"),
    (["--upstream", "/c", "--upstream-precision", "fp16"], "fp16"),  # fp32 run: the oracle is on for it
    (["--upstream", "/c", "--precision", "fp16", "--upstream-precision", "fp32"], "fp32"),
])
def test_upstream_precision_settings(argv, expected):
    """--upstream-precision: the upstream rows' precision ('same' = --precision), and the float64
    oracle on by default whenever any row runs below fp32; refused without --upstream."""
    bench = _load_script()
    parser = bench.build_parser()
    s = bench.resolve_settings(parser.parse_args(["--device", "cpu", *argv]))
    assert s["upstream_precision"] == expected
    assert s["fp64_check"] == (s["precision"] != "fp32" or expected not in (None, "fp32"))
    for given in ("same", "amp"):
        with pytest.raises(SystemExit, match="--upstream-precision .* needs --upstream PATH"):
            bench.resolve_settings(parser.parse_args(["--device", "cpu", "--upstream-precision", given]))


@pytest.mark.parametrize("vs_fp64, vs_ref, run_tol, expected", [
    (0.5, 2.0, 4.0, "ok (vs fp64)"),  # another precision: the oracle with the row's own tolerance decides
    (2.0, 0.01, 4.0, "FAIL (vs fp64"),  # ... even when reference (another precision) is close
    (None, 3.0, 4.0, "ok"),  # no oracle: reference, with the larger of the two tolerances
    (None, 5.0, 4.0, "FAIL (>"),
    (None, 0.5, None, "ok"),  # the run's precision: as before
    (1.5, 1.5, None, "FAIL (>"),  # no reference row's own float64 error to compare with
])
def test_judge_rows_at_another_precision(vs_fp64, vs_ref, run_tol, expected):
    """judge(): errors given in units of the row's tolerance (a fresh random one)."""
    bench = _load_script()
    tol = float(torch.rand(()) * 0.1 + 1e-3)
    r = bench.Runner("m", "upstream", "upstream (amp)", None, lambda: None, kind="upstream")
    r.row.update(max_rel_err_vs_reference=vs_ref * tol,
                 **({} if vs_fp64 is None else {"max_rel_err_vs_fp64": vs_fp64 * tol}))
    verdict = bench.judge(r, [r], tol, None if run_tol is None else run_tol * tol)
    assert verdict.startswith(expected), verdict


@pytest.mark.parametrize("bench_kind, precision, upstream_precision", [
    ("inference", "bf16", "fp32"),
    ("train", "fp32", "amp"),  # the float64 oracle is on for the amp row alone
])
def test_cli_upstream_precision(tmp_path, capsys, bench_kind, precision, upstream_precision):
    """--upstream-precision end to end (in process, one timed iteration): the upstream row runs at its
    own precision (an fp32 upstream row beside bf16 ones is as close to float64 as fp32 is), is
    checked against the float64 oracle with its own tolerance, says its precision in the JSON and the
    table, and stays the base of the ratio column."""
    bench = _load_script()
    out = tmp_path / "bench.json"
    clone = fake_upstream(tmp_path / "clone")
    assert bench.main(["--model", "groupmixformer_m", "--img-size", "64", "--device", "cpu", "--bench", bench_kind,
                       "--batch-size", "2", "--num-warm-iter", "0", "--num-bench-iter", "1", "--backends",
                       "torch,reference", "--no-timm", "--precision", precision, "--upstream", str(clone),
                       "--upstream-precision", upstream_precision, "--results-file", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = {r["backend"]: r for r in data["rows"]}
    up, ref = rows["upstream"], rows["reference"]
    assert data["meta"]["settings"]["upstream_precision"] == upstream_precision and data["meta"]["settings"]["fp64_check"]
    assert up["status"] == "ok" and up["precision"] == upstream_precision and up["label"] == f"upstream ({upstream_precision})"
    assert ref["precision"] == rows["torch"]["precision"] == precision
    _, autocast_dtype, compute = bench.dtypes_for(upstream_precision, "cpu")
    assert up["tolerance"] == bench.tolerance(compute, "cpu") != ref["tolerance"]
    assert up["check"] == "ok (vs fp64)", up
    assert up["ratio_vs_upstream"] == 1.0 and rows["torch"]["ratio_vs_upstream"] > 0
    assert f"upstream ({upstream_precision})" in stdout
    assert f"the upstream rows run at {upstream_precision} (--upstream-precision), the others at {precision}" in stdout
    if upstream_precision == "fp32":  # fp32 against the oracle, beside a bf16 reference
        assert up["max_rel_err_vs_fp64"] < 1e-4 < ref["max_rel_err_vs_fp64"]
    if bench_kind == "train":
        assert math.isfinite(up["first_step_loss"]) and "upstream rows at --upstream-precision amp" in \
            data["meta"]["train_step_definition"]


def _ours_and_input(dtype=torch.float64):
    """GroupMixFormer-M (one block per stage) with random weights and BatchNorm statistics, in eval
    mode, and a random input."""
    import gmf_kernels as gmf
    ours = gmf.create_model("groupmixformer_m", backend="reference", serial_depths=[1, 1, 1, 1]).eval()
    randomize_bn_stats_(ours, seed=int(torch.randint(0, 2 ** 31, ())))
    return ours.to(dtype), torch.randn(2, 3, 64, 64, dtype=dtype)


def test_upstream_loader(tmp_path):
    """load_upstream_model builds upstream's class with our config; upstream_with_weights loads our
    state_dict strictly, so that both models compute the same logits (float64); the ipdb stub is
    used only when ipdb is missing and the clone never lands on sys.path."""
    from gmf_kernels.models.configs import MODEL_CONFIGS
    lib = _load_script().upstream_lib()
    clone = fake_upstream(tmp_path / "clone")
    model = lib.load_upstream_model(clone, "m", serial_depths=[1, 1, 1, 1])
    cfg = MODEL_CONFIGS["groupmixformer_m"]
    assert model.upstream_kwargs == dict(embedding_dims=cfg["embedding_dims"], serial_depths=[1, 1, 1, 1],
                                         mlp_ratios=cfg["mlp_ratios"], num_heads=8, qkv_bias=True)
    assert str(clone) not in sys.path and str(clone / "models") not in sys.path
    assert any("ipdb" in n for n in model.gmf_notes) == (not _importable("ipdb"))

    ours, x = _ours_and_input()
    up = lib.upstream_with_weights(clone, "m", ours.state_dict(), serial_depths=[1, 1, 1, 1]).to(torch.float64).eval()
    assert isinstance(up.norm4, torch.nn.SyncBatchNorm) and "SyncBatchNorm" in lib.syncbn_note(up)
    for k, v in ours.state_dict().items():
        assert torch.equal(up.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(up(x), ours(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["missing path", "not a clone", "missing dependency", "timm", "einops",
                                  "extra parameter", "renamed head", "no class"])
def test_upstream_errors(tmp_path, case):
    """Each way --upstream can go wrong gives UpstreamError saying why (and what to do)."""
    lib = _load_script().upstream_lib()
    clone = tmp_path / "clone"
    if case == "missing path":
        expected = ["does not exist", str(clone)]
    elif case == "not a clone":
        clone.mkdir()
        expected = ["models/groupmixformer.py", "AILab-CVC/GroupMixFormer"]
    elif case in ("missing dependency", "timm", "einops"):
        module = {"missing dependency": MISSING_DEP, "timm": "timm.models.layers", "einops": "einops"}[case]
        if case != "missing dependency" and _importable(module.split(".")[0]):
            pytest.skip(f"{module} is installed here")
        fake_upstream(clone, imports=f"import ipdb\nimport {module}")
        top = module.split(".")[0]  # the module Python finds missing is the package
        expected = [f"imports {top!r}", f"pip install {top}"]
    elif case == "extra parameter":
        fake_upstream(clone, extra="self.extra_scale = nn.Parameter(torch.ones(1))")
        expected = ["strict", "1 upstream key(s) not in ours: extra_scale"]
    elif case == "renamed head":
        fake_upstream(clone, extra="self.classifier = self.head; del self.head")
        expected = ["upstream key(s) not in ours: classifier.weight, classifier.bias",
                    "of our key(s) not in upstream's: head.weight, head.bias"]
    else:
        (clone / "models").mkdir(parents=True)
        (clone / "models" / "groupmixformer.py").write_text("Model = None\n")
        expected = ["defines no class GroupMixFormer"]
    registered = sys.modules.get(lib.MODULE_NAME)
    with pytest.raises(lib.UpstreamError) as info:
        lib.upstream_with_weights(clone, "m", _ours_and_input(torch.float32)[0].state_dict(),
                                  serial_depths=[1, 1, 1, 1])
    for text in expected:
        assert text in str(info.value), (text, str(info.value))
    assert sys.modules.get(lib.MODULE_NAME) is registered or case in ("extra parameter", "renamed head")
    assert "ipdb" not in sys.modules or _importable("ipdb")  # the stub never outlives the import


def test_cli_refuses_before_timing(tmp_path, monkeypatch):
    """A wrong --upstream PATH and --plot without matplotlib end the run before anything is built."""
    bench = _load_script()
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: pytest.fail("timing started"))
    with pytest.raises(SystemExit) as info:
        bench.main(["--device", "cpu", "--upstream", str(tmp_path / "nowhere")])
    assert "--upstream" in str(info.value) and "does not exist" in str(info.value)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as info:
        bench.main(["--device", "cpu", "--plot", str(tmp_path / "p.png")])
    assert "pip install matplotlib" in str(info.value)


def test_cli_upstream_compare_plot(tmp_path):
    """Inference with --upstream (a fake clone), its torch.compile row (compiler backend "eager":
    Dynamo's capture without inductor's code generation), --compare of two timm models and --plot:
    the upstream rows are checked against reference, the upstream row is the base of the ratio column,
    and every row also has its ratio to upstream+compile; a timm model that cannot run is listed under
    "not run" with its reason; the PNG is written."""
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    clone = fake_upstream(tmp_path / "clone")
    plot = ["--plot", str(png)] if _importable("matplotlib") else []
    compare = "swin_tiny_patch4_window7_224,coat_lite_small"
    proc = _run_script("--batch-size", "1", "--num-warm-iter", "0", "--num-bench-iter", "2", "--backends",
                       "torch,reference", "--upstream", str(clone), "--compare", compare, "--results-file", str(out),
                       "--torchcompile", "eager", "--compile-backends", "upstream", *plot)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vs upstr" in proc.stdout and "summary (ratios to `upstream`" in proc.stdout
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    up, ref, torch_row = rows["upstream"], rows["reference"], rows["torch"]
    assert up["kind"] == "upstream" and up["label"] == f"upstream ({clone})" and up["status"] == "ok", up
    assert up["check"] == "ok" and up["max_rel_err_vs_reference"] < 1e-5
    assert up["ratio_vs_upstream"] == 1.0 and up["ratio_of_min_vs_upstream"] == 1.0
    for r in (ref, torch_row):
        assert r["ratio_vs_upstream"] == pytest.approx(up["median_ms"] / r["median_ms"])
        assert r["ratio_of_min_vs_upstream"] == pytest.approx(up["min_ms"] / r["min_ms"])
        assert len(r["ratio_per_round_vs_upstream"]) == 2
    assert ref["ratio_vs_reference"] == 1.0  # the JSON keeps the ratios to reference too
    up_c = rows["upstream+compile"]
    assert up_c["kind"] == "upstream" and up_c["status"] == "ok" and up_c["check"] == "ok", up_c
    assert up_c["label"] == "upstream+compile (eager)" and up_c["compile_s"] > 0
    assert up_c["max_rel_err_vs_reference"] < 1e-5 and up_c["n_timed"] == 2
    assert "torch+compile" not in rows  # only the backends named in --compile-backends compile
    for r in (ref, torch_row, up):
        assert r["ratio_vs_upstream_compile"] == pytest.approx(up_c["median_ms"] / r["median_ms"])
        assert len(r["ratio_per_round_vs_upstream_compile"]) == 2
    assert up_c["ratio_vs_upstream_compile"] == 1.0
    assert up_c["ratio_vs_upstream"] == pytest.approx(up["median_ms"] / up_c["median_ms"])
    assert "vs upstream+compile (torch.compile of upstream's own model, eager" in proc.stdout
    timm_rows = [rows[f"timm:{n}"] for n in compare.split(",")]
    if not _importable("timm"):
        assert "not run:" in proc.stdout
        for r in timm_rows:
            assert r["status"] == "skipped" and "timm cannot be imported" in r["reason"], r
            assert f"timm {r['backend'][5:]}: skipped: timm cannot be imported" in proc.stdout
    else:
        assert all(r["status"] == "ok" or r.get("reason") for r in timm_rows), timm_rows
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot written to" in proc.stdout


def test_plot_bars(tmp_path):
    """write_plot draws one bar per row that ran (not the others), with its images/s."""
    pytest.importorskip("matplotlib")
    bench = _load_script()
    rate = torch.rand(3).add(1).tolist()
    rows = [dict(model="groupmixformer_t", backend=b, label=b, kind=k, status="ok", img_per_s=v)
            for (b, k), v in zip([("torch", "gmf"), ("upstream", "upstream"), ("timm:x", "baseline")], rate)]
    rows.append(dict(model="groupmixformer_t", backend="triton", label="triton", kind="gmf", status="unavailable"))
    settings = dict(bench="inference", batch_size=8, precision="bf16", img_size=224)
    bars = bench.write_plot(str(tmp_path / "p.png"), rows, settings, {"device_name": "CPU: test"})
    assert bars == [("torch", rate[0]), ("upstream", rate[1]), ("timm:x", rate[2])]
    assert (tmp_path / "p.png").stat().st_size > 1000


# ------------------------------------------------------------------ --deadline and the row order
def test_run_order_yardsticks_first():
    """Rows run reference, upstream, the fused backends eager, upstream+compile, the fused backends compiled,
    optimized, the other backends eager then compiled (each group in backend order), timm; whatever order
    they were built in."""
    bench = _load_script()
    from gmf_kernels.backends import BACKEND_NAMES, get_backend
    from gmf_kernels.backends.base import FusedBackend
    fused = [b for b in BACKEND_NAMES if isinstance(get_backend(b), FusedBackend)]
    other = [b for b in BACKEND_NAMES if b not in fused and b != "reference"]
    assert {"cuda", "triton"} <= set(fused) and "torch" in other
    kinds = {"upstream": "upstream", "upstream+compile": "upstream", "timm:x": "baseline"}
    expected = (["reference", "upstream"] + fused + ["upstream+compile"] + [f"{b}+compile" for b in fused]
                + ["optimized"] + other + [f"{b}+compile" for b in other + ["reference"]] + ["timm:x"])
    for trial in range(3):
        built = [expected[i] for i in torch.randperm(len(expected)).tolist()]
        runners = [bench.Runner("m", b, b, None, lambda: None, kind=kinds.get(b, "gmf")) for b in built]
        assert [r.backend for r in bench.run_order(runners)] == expected, built


def test_run_order_compiles_the_fastest_eager_backend_first():
    """With the eager rows' medians known, the compiled fused rows run fastest eager base first (the one
    --deadline most needs: an H200 run had room for one 74 s compile); eager rows and the groups keep
    their order; a compiled row whose eager row has no time yet goes after those that have one."""
    bench = _load_script()
    names = ["reference", "upstream", "cuda", "triton", "upstream+compile", "cuda+compile", "triton+compile",
             "torch", "torch+compile"]
    kinds = {"upstream": "upstream", "upstream+compile": "upstream"}
    runners = [bench.Runner("m", b, b, None, lambda: None, kind=kinds.get(b, "gmf")) for b in names]
    order = lambda measured: [r.backend for r in bench.run_order(runners, measured)]  # noqa: E731
    assert order(None) == names
    assert order({"cuda": 0.064, "triton": 0.047, "torch": 0.01}) == [
        "reference", "upstream", "cuda", "triton", "upstream+compile", "triton+compile", "cuda+compile",
        "torch", "torch+compile"]
    assert order({"cuda": 0.064}).index("cuda+compile") < order({"cuda": 0.064}).index("triton+compile")
    assert order({"triton": 0.05}).index("triton+compile") < order({"triton": 0.05}).index("cuda+compile")
    for r, t in zip(runners, range(1, 10)):
        r.times = [t * 0.01] * 3
    assert bench.eager_medians(runners) == pytest.approx(
        {"reference": 0.01, "cuda": 0.03, "triton": 0.04, "torch": 0.08})


def test_deadline_reason_for_compiles():
    """Under --deadline a row is not started once the time is up, a compiling row is not started when
    the quickest compile of the run so far took longer than the time left, and another row when the
    quickest first call and check of the others did; without a deadline, always."""
    bench = _load_script()
    settings = {"deadline_s": 100.0}
    ctx = types.SimpleNamespace(settings=settings, compile_s=[], first_s=[], time_left=lambda: 30.0)
    eager, compiled = (bench.Runner("m", b, b, None, lambda: None) for b in ("torch", "torch+compile"))
    assert bench.deadline_reason(ctx, eager) is None and bench.deadline_reason(ctx, compiled) is None
    ctx.compile_s += [45.0, 40.0]
    assert bench.deadline_reason(ctx, eager) is None
    assert "quickest torch.compile of this run took 40 s" in bench.deadline_reason(ctx, compiled)
    ctx.compile_s[:] = [25.0]
    assert bench.deadline_reason(ctx, compiled) is None
    ctx.first_s += [31.0, 35.0]
    assert "quickest first call and check of this run took 31.0 s" in bench.deadline_reason(ctx, eager)
    assert bench.deadline_reason(ctx, compiled) is None  # a compile is judged by the compiles
    ctx.first_s.append(29.0)
    assert bench.deadline_reason(ctx, eager) is None
    ctx.time_left = lambda: -1.0
    assert bench.deadline_reason(ctx, eager) == "not run: --deadline 100 s reached"
    ctx.time_left = lambda: math.inf
    ctx.compile_s[:], ctx.first_s[:] = [1e9], [1e9]
    assert bench.deadline_reason(ctx, compiled) is None and bench.deadline_reason(ctx, eager) is None


def test_timer_starts_no_call_after_stop_at():
    """Timer.run(stop_at=): the calls stop at the time given however slow they turn out (the estimate from
    one call is not trusted), and the times returned are the calls made; without it, all n run."""
    bench = _load_script()
    timer = bench.Timer(torch.device("cpu"))
    calls = []

    def slowing():  # each call slower than the last: a machine whose load grows
        calls.append(1)
        time.sleep(0.002 * len(calls))
    stop_at = time.monotonic() + 0.25
    times, total = timer.run(slowing, 10_000, stop_at=stop_at)
    assert len(times) == len(calls) and 3 <= len(calls) < 10_000
    assert time.monotonic() - stop_at < 0.002 * len(calls) + 0.5  # the last call past it (and a loaded machine)
    assert all(t >= 2.0 * (i + 1) * 0.9 for i, t in enumerate(times))
    calls.clear()
    times, _ = timer.run(lambda: calls.append(1), 50)
    assert len(times) == len(calls) == 50
    times, _ = timer.run(lambda: calls.append(1), 50, stop_at=time.monotonic() - 1.0)
    assert times == [] and len(calls) == 50


def _slowing_rows(bench, seconds_left: float, n: int, slow: Dict[str, Callable[[int, float], float]]):
    """A --deadline context with `seconds_left` for rows, and one row per entry of `slow`: a forward whose
    first call takes 5 ms and call i > 1 `slow[name](i, end)` seconds (a machine whose load grew after the
    first call; end: when the rows' time is up), for time_row / time_rows_interleaved."""
    end = time.monotonic() + seconds_left
    ctx = types.SimpleNamespace(
        settings={"num_warm_iter": 2, "num_bench_iter": n, "deadline_s": 100.0}, progress=bench.Progress(True),
        timer=bench.Timer(torch.device("cpu")), deadline=end + bench.DEADLINE_RESERVE_S, x=None,
        autocast=contextlib.nullcontext, time_left=lambda: end - time.monotonic(), rows_end=lambda: end)
    rows = []
    for name, sec in slow.items():
        calls = []

        def forward(x, calls=calls, sec=sec):
            calls.append(1)
            time.sleep(0.005 if len(calls) == 1 else sec(len(calls), end))
        rows.append(bench.Runner("m", name, name, forward, lambda: None))
    return ctx, rows, end


def test_deadline_cuts_calls_slower_than_the_first():
    """Block schedule: the first call plans ~200 calls into 1 s, the later ones are 4x slower; no call starts
    after the rows' time, the row keeps the calls it made and says the time ran out (fewer than MIN_TIMED
    made: not timed)."""
    bench = _load_script()
    ctx, (r,), end = _slowing_rows(bench, 1.0, 1000, {"torch": lambda i, end: 0.02})
    bench.time_row(ctx, r, "m")
    assert time.monotonic() - end < 0.5
    assert r.alive and bench.MIN_TIMED <= len(r.times) < 100, len(r.times)
    assert "the time ran out" in r.row["deadline_note"] and f"+ {len(r.times)} timed" in r.row["deadline_note"]
    ctx, (r,), end = _slowing_rows(bench, 0.3, 1000, {"torch": lambda i, end: 0.2})
    bench.time_row(ctx, r, "m")
    assert time.monotonic() - end < 0.5
    assert not r.alive and r.row["status"] == "deadline" and "before the time was up" in r.row["reason"]
    assert r.times == []


def test_deadline_drops_a_round_cut_part_way():
    """Interleave schedule: when the time is up inside a round (reference's 7th call -- a probe, a warm-up,
    then the 5th round -- ends past it), that round is dropped from every row, so that the rows keep the
    same rounds (the paired ratios compare round i with round i)."""
    bench = _load_script()

    def reference(i, end):
        return end - time.monotonic() + 0.01 if i == 7 else 0.005
    ctx, rows, end = _slowing_rows(bench, 1.0, 1000, {"reference": reference, "torch": lambda i, end: 0.005})
    bench.time_rows_interleaved(ctx, rows, "m", lambda: None)
    assert time.monotonic() - end < 0.5
    ref, tor = rows
    assert ref.alive and tor.alive and len(ref.times) == len(tor.times) == 4, (len(ref.times), len(tor.times))
    assert ref.row["deadline_note"] == tor.row["deadline_note"] == f"cut by --deadline: {len(ref.times)} of 1000 rounds"


@pytest.mark.parametrize("schedule", ["block", "interleave"])
def test_deadline_ends_the_run_in_time(tmp_path, schedule):
    """--deadline with far more iterations than fit: the run ends by itself within the deadline (report
    printed, results complete), every row it timed says how its iterations were cut; in the block schedule
    the first row (reference) takes the time, and the next gets what its estimate left over (a few calls,
    or it is listed as not run or not timed)."""
    out = tmp_path / "bench.json"
    deadline = 14.0
    proc = _run_script("--batch-size", "1", "--num-warm-iter", "2", "--num-bench-iter", "100000", "--no-timm",
                       "--backends", "torch,reference", "--schedule", schedule, "--deadline", str(deadline),
                       "--results-file", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    meta, rows = data["meta"], {r["backend"]: r for r in data["rows"] if r["kind"] == "gmf"}
    assert meta["complete"] is True and meta["deadline"]["seconds"] == deadline
    assert meta["deadline"]["since_start_s"] < deadline, meta["deadline"]
    ref = rows["reference"]
    assert ref["status"] == "ok" and 3 <= ref["n_timed"] < 100000 and ref["deadline_note"].startswith("cut by")
    torch_row = rows["torch"]
    if schedule == "block":
        assert "reference (upstream's ops): cut by --deadline" in proc.stdout
        if torch_row["status"] == "deadline":  # no time left to start it, or to time it
            assert torch_row["reason"].startswith(("not run:", "not timed:")), torch_row
            assert torch_row["reason"] in proc.stdout
        else:
            assert torch_row["status"] == "ok" and torch_row["deadline_note"].startswith("cut by"), torch_row
    else:  # one round of each row at a time: both cut alike
        assert torch_row["status"] == "ok" and torch_row["n_timed"] == ref["n_timed"]
        assert torch_row["deadline_note"] == ref["deadline_note"] and "rounds" in ref["deadline_note"]
    assert meta["deadline"]["rows_cut"] == sum(bool(r.get("deadline_note")) for r in rows.values())
    assert meta["deadline"]["rows_not_run"] == (torch_row["status"] == "deadline")


@pytest.mark.parametrize("bench_kind", ["inference", "train"])
def test_results_saved_after_every_row(bench_kind):
    """The results file is rewritten after each row's check and after its timing (block schedule), so that
    a run killed part-way keeps every row it finished: the saves show the reference row checked before it
    is timed, then timed before the next row starts."""
    bench = _load_script()
    argv = ["--device", "cpu", "--model", "groupmixformer_m", "--img-size", "64", "--batch-size", "1",
            "--num-warm-iter", "0", "--num-bench-iter", "1", "--schedule", "block", "--backends", "torch,reference",
            "--no-timm", "--bench", bench_kind]
    settings = bench.resolve_settings(bench.build_parser().parse_args(argv))
    saves = []
    rows = bench.benchmark(settings, ["groupmixformer_m"], ["torch", "reference"], bench.Progress(quiet=True),
                           on_model_done=lambda rows: saves.append(json.loads(json.dumps(rows, default=str))))

    def state(save, backend):
        r = next((r for r in save if r["backend"] == backend), {})
        return "timed" if r.get("status") == "ok" else "checked" if "check" in r else "-"
    seen = [(state(s, "reference"), state(s, "torch")) for s in saves]
    # drop repeats (the end of the model saves again)
    steps = [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]
    assert steps == [("checked", "-"), ("timed", "-"), ("timed", "checked"), ("timed", "timed")], seen
    assert {r["backend"]: r["status"] for r in rows if r["kind"] == "gmf"} == {"torch": "ok", "reference": "ok"}


@pytest.mark.parametrize("bench_kind", ["inference", "train"])
def test_profile_steps_record_where_the_time_goes(bench_kind):
    """--profile-steps N: once every row is timed, N more calls of each under torch.profiler fill the row's
    `profile` (on CPU: the operators' self time; on a GPU, the device kernels): shares by kind that add
    up to 1, the top entries with their time per call (the default, 0, profiles nothing: `profile_row`)."""
    bench = _load_script()
    base = ["--device", "cpu", "--model", "groupmixformer_m", "--img-size", "64", "--batch-size", "1",
            "--num-warm-iter", "0", "--num-bench-iter", "1", "--schedule", "block", "--backends", "torch,reference",
            "--no-timm", "--bench", bench_kind]
    assert bench.resolve_settings(bench.build_parser().parse_args(base))["profile_steps"] == 0
    for steps in (2,):
        settings = bench.resolve_settings(bench.build_parser().parse_args(base + ["--profile-steps", str(steps)]))
        rows = bench.benchmark(settings, ["groupmixformer_m"], ["torch", "reference"], bench.Progress(quiet=True))
        gmf = [r for r in rows if r["kind"] == "gmf"]
        assert {r["status"] for r in gmf} == {"ok"}
        for r in gmf:
            prof = r["profile"]
            assert "error" not in prof, prof
            assert prof["device"] == "cpu" and prof["calls"] == 2 and prof["total_ms"] > 0
            assert sum(prof["kinds"].values()) == pytest.approx(1.0)
            assert 0 < len(prof["top"]) <= bench.PROFILE_TOP
            assert all(t["ms"] > 0 and 0 < t["share"] <= 1 for t in prof["top"])
            assert [t["ms"] for t in prof["top"]] == sorted((t["ms"] for t in prof["top"]), reverse=True)
    with pytest.raises(SystemExit):
        bench.resolve_settings(bench.build_parser().parse_args(base + ["--profile-steps", "-1"]))
    interleaved = [a if a != "block" else "interleave" for a in base]     # profiled nothing, said nothing
    with pytest.raises(SystemExit, match="--profile-steps .* add --schedule block"):
        bench.resolve_settings(bench.build_parser().parse_args(interleaved + ["--profile-steps", "1"]))


def test_kernel_table_of_device_kernels():
    """Device kernels summed by name -> ms per call, shares by kind (adding up to 1), top kernels longest
    first with their launches per call."""
    bench = _load_script()
    rows = [("gma_aggregate_kernel", 6000.0, 4), ("sm90_xmma_gemm_bf16", 3000.0, 8),
            ("void at::native::vectorized_elementwise_kernel<4>", 1000.0, 40)]
    t = bench.kernel_table(rows, 2, "cuda")
    assert t["device"] == "cuda" and t["total_ms"] == pytest.approx(5.0)
    assert t["kinds"] == pytest.approx({"ours": 0.6, "gemm": 0.3, "elementwise / reduction / copy": 0.1})
    assert [x["name"] for x in t["top"]] == [r[0] for r in rows]
    assert t["top"][0]["ms"] == pytest.approx(3.0) and t["top"][2]["per_call"] == 20


def test_profiles_run_after_every_row_is_timed_fused_rows_first():
    """The profiles come after the timing of every row (a short --deadline cut the fused rows' timing behind the
    yardsticks' profiles), the fused backends' rows (eager and compiled) first."""
    bench = _load_script()
    rows = [bench.Runner("m", b, b, None, lambda: None, kind=k) for b, k in
            [("reference", "gmf"), ("upstream", "upstream"), ("triton", "gmf"), ("upstream+compile", "upstream"),
             ("cuda+compile", "gmf"), ("torch", "gmf"), ("swin", "baseline")]]
    assert [r.backend for r in bench.profile_order(rows)] == [
        "triton", "cuda+compile", "reference", "upstream", "upstream+compile", "torch", "swin"]
    src = inspect.getsource(bench.run_rows)
    assert src.index("time_row(") < src.index("for r in profile_order(order)") < src.index("profile_row(")


def test_profile_fits_in_seconds_from_ms_medians():
    """Row times are in ms, the deadline's time left in seconds: a 300 ms training step profiled once
    fits in 10 s (0.6 s of calls + 5 s), not in 5 s."""
    bench = _load_script()
    assert bench.profile_fits(10.0, 1, 300.0) and not bench.profile_fits(5.0, 1, 300.0)
    assert bench.profile_fits(6.0, 2, 50.0) and not bench.profile_fits(5.1, 2, 50.0)


def test_kernel_kinds_by_name():
    """Device kernel names -> the kinds the profile's shares are given by (first match wins)."""
    bench = _load_script()
    cases = {"gma_aggregate_kernel": "ours", "gma_b2_attention_kernel": "ours",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "gemm",
             "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT": "gemm", "cutlass_80_tensorop_s1688gemm": "gemm",
             "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw": "convolution",
             "triton_per_fused_native_layer_norm_0": "triton (torch.compile)",
             "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda, convert>":
             "elementwise / reduction / copy",
             "cudnn::cnn::conv2d_grouped_direct_kernel": "convolution",
             "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>": "normalisation",
             "triton_per_fused_add_gelu_0": "triton (torch.compile)",
             "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>":
             "elementwise / reduction / copy", "some_unknown_kernel": "other"}
    assert {n: bench.kernel_kind(n) for n in cases} == cases


def test_cpu_operator_kinds_by_name():
    """A CPU profile (no device kernels: the operators' self time) is shared by kind of operator too, not
    all "other"."""
    bench = _load_script()
    cases = {"aten::mkldnn_convolution": "convolution", "aten::_convolution": "convolution",
             "aten::addmm": "gemm", "aten::mm": "gemm", "aten::bmm": "gemm",
             "aten::native_layer_norm": "normalisation", "aten::native_batch_norm": "normalisation",
             "aten::gelu": "elementwise / reduction / copy", "aten::copy_": "elementwise / reduction / copy",
             "aten::add": "elementwise / reduction / copy", "gmf::gma_forward": "ours",
             "cudaDeviceSynchronize": "other"}
    assert {n: bench.kernel_kind(n, "cpu") for n in cases} == cases
    t = bench.kernel_table([("aten::addmm", 3000.0, 2), ("aten::mkldnn_convolution", 1000.0, 2)], 1, "cpu")
    assert t["kinds"] == pytest.approx({"gemm": 0.75, "convolution": 0.25})
    assert [x["kind"] for x in t["top"]] == ["gemm", "convolution"]


def test_cuda_graph_rows_do_not_report_a_replays_memory():
    """A row that replays a CUDA graph allocates nothing in the measured call (its activations sit
    in the graph's private pool): its peak is "not measured", never about one output's size. The
    CUDA branch's early return, checked with a stand-in context (no torch.cuda call is reached)."""
    bench = _load_script()
    ctx = types.SimpleNamespace(dev_type="cuda", time_left=lambda: 100.0)
    r = bench.Runner("m", "optimized", "optimized (cudagraphs)", None, lambda: None)
    r.times = [0.01]
    r.row.update(cudagraphs=True)
    bench.measure_row_memory(ctx, r)
    assert r.row["peak_mem_mib"] is None and "CUDA graphs" in r.row["peak_mem_note"]


def test_train_support_reasons_take_each_stage_grid():
    """--bench train asks each backend about every GMA layer at its own stage's grid (56, 28, 14, 7
    at 224): the largest batch the Triton training kernels take is set by the stage with the most
    B N 3C elements per image, not by the last stage's width at the first stage's grid."""
    import gmf_kernels as gmf
    from gmf_kernels.triton_kernels.config import MAX_TRAIN_ELEMENTS
    bench = _load_script()
    model = gmf.create_model("groupmixformer_s", backend="reference")
    dims, grids = [f["num_chs"] for f in model.feature_info], (56, 28, 14, 7)
    limit = min(MAX_TRAIN_ELEMENTS // (g * g * 3 * C) for C, g in zip(dims, grids))
    ctx = types.SimpleNamespace(S=224, B=limit, compute_dtype=torch.float32, dev_type="cpu", device=torch.device("cpu"))
    assert bench.train_support_reasons(ctx, "triton", model) == []
    ctx.B = limit + 1
    reasons = bench.train_support_reasons(ctx, "triton", model)
    assert len(reasons) == 1 and "32-bit offsets" in reasons[0] and "N=3136" in reasons[0], reasons


def test_a_lost_cuda_context_ends_the_run_with_its_marker(tmp_path, monkeypatch, capsys):
    """A row that fails with a sticky CUDA error (the context is gone: `ops.cuda_alive` False) ends
    the run: the rows so far saved, meta.context_lost, the marker line gpu_report.py reruns on, rc 3.
    A failed row whose context still works does not (mocked: there is no GPU here)."""
    tp = _load_script()
    ops = tp.ops_lib()
    row = {"backend": "cuda+compile", "label": "cuda+compile", "status": "error", "reason": "CUDA error: an "
           "illegal memory access was encountered"}
    r = types.SimpleNamespace(backend="cuda+compile", row=dict(row))
    ctx = types.SimpleNamespace(device=torch.device("cuda"))
    saved = []
    monkeypatch.setattr(ops, "cuda_alive", lambda: True)
    tp.check_context(ctx, r, lambda: saved.append(1))          # the context works: the run goes on
    monkeypatch.setattr(ops, "cuda_alive", lambda: False)
    tp.check_context(types.SimpleNamespace(device=torch.device("cpu")), r, lambda: saved.append(1))
    tp.check_context(ctx, types.SimpleNamespace(backend="cuda", row={"status": "ok"}), lambda: saved.append(1))
    assert not saved
    with pytest.raises(ops.CudaContextLost) as e:
        tp.check_context(ctx, r, lambda: saved.append(1))
    assert saved == [1] and e.value.impl == "cuda+compile" and "context was lost" in r.row["reason"]

    def fake_benchmark(settings, models, requested, progress, on_model_done=None):
        on_model_done([{"backend": "reference", "label": "reference", "status": "ok"}, r.row])
        raise ops.CudaContextLost("cuda+compile", r.row["reason"])
    monkeypatch.setattr(tp, "benchmark", fake_benchmark)
    out = tmp_path / "res.json"
    rc = tp.main(["--model", "groupmixformer_m", "--device", "cpu", "--results-file", str(out)])
    assert rc == 3
    data = json.loads(out.read_text())
    assert data["meta"]["context_lost"]["backend"] == "cuda+compile" and data["meta"]["complete"] is False
    assert [x["backend"] for x in data["rows"]] == ["reference", "cuda+compile"]
    assert "GMF_CUDA_CONTEXT_LOST impl=cuda+compile error=CUDA error: an illegal memory access" in capsys.readouterr().out


def test_first_call_records_its_warnings():
    """A row's first call keeps the distinct warnings it raised (a fused backend's fallback says which path
    the row times), also when the call fails; at most MAX_ROW_WARNINGS, each cut to WARNING_CHARS."""
    import warnings
    bench = _load_script()

    class Row:
        kind, alive = "gmf", True

        def __init__(self, backend="torch"):
            self.row, self.backend = {}, backend

        def prepare(self):
            warnings.warn("prepared", UserWarning)
    ctx = types.SimpleNamespace(timer=types.SimpleNamespace(sync=lambda: None))
    fallback = "gmf_kernels cuda backend: training statistics and backward run as PyTorch ops, not kernels"

    def ok():
        for _ in range(2):
            warnings.warn(fallback, RuntimeWarning)
        warnings.warn("x" * 1000, FutureWarning)
        return 7
    r = Row()
    assert bench.timed_first_call(ctx, r, ok) == 7
    assert r.row["warnings"][:2] == ["UserWarning: prepared", f"RuntimeWarning: {fallback}"], r.row
    assert len(r.row["warnings"]) == 3 and len(r.row["warnings"][2]) == bench.WARNING_CHARS
    assert "inductor_cache" not in r.row       # an eager row compiles nothing
    assert "gma_backends" not in r.row         # no GMA layer ran
    r = Row("torch+compile")
    assert bench.timed_first_call(ctx, r, ok) == 7
    # a compiled row: the cache counts of its first call (nothing compiled by `ok`: all zero)
    assert r.row["inductor_cache"] == {name: 0 for _, name in bench.INDUCTOR_CACHE_COUNTERS}

    def fails():
        warnings.warn(fallback, RuntimeWarning)
        raise RuntimeError("boom")
    r = Row()
    assert bench.timed_first_call(ctx, r, fails) is None
    assert r.row["status"] == "error" and r.row["warnings"] == ["UserWarning: prepared", f"RuntimeWarning: {fallback}"]

    def many():
        for i in range(9):
            warnings.warn(f"w{i}")
    r = Row()
    bench.timed_first_call(ctx, r, many)
    assert len(r.row["warnings"]) == bench.MAX_ROW_WARNINGS
    r = Row()
    r.prepare = lambda: None
    bench.timed_first_call(ctx, r, lambda: 1)
    assert "warnings" not in r.row


def test_outputs_checked_before_any_timing(tmp_path, monkeypatch):
    """--results-file under a file or naming a folder, --plot in a format matplotlib does not write, and a
    --model list naming nothing stop the run at once with the flag named (they failed after the timing)."""
    bench = _load_script()
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: pytest.fail("timed before checking the outputs"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    base = ["--model", "groupmixformer_m", "--img-size", "64", "--device", "cpu", "--no-timm", "--quiet"]
    for flag, path, fragment in (("--results-file", str(blocker / "r.json"), "cannot make its folder"),
                                 ("--results-file", str(tmp_path) + "/", "a folder")):
        with pytest.raises(SystemExit, match=f"{flag} .*{fragment}"):
            bench.main(base + [flag, path])
    with pytest.raises(SystemExit, match="names no model"):
        bench.main(["--model", ",", "--device", "cpu", "--no-timm"])
    if _importable("matplotlib"):
        with pytest.raises(SystemExit, match="--plot .*not .txt"):
            bench.main(base + ["--plot", str(tmp_path / "p.txt")])


def test_nothing_ran_is_not_a_pass():
    """Exit 2 (`nothing_ran`) when no row of ours ran, or none of the backends named with --backends did (a
    --backends cuda run on a CPU timed only the reference and exited 0)."""
    bench = _load_script()
    row = lambda backend, status, kind="gmf": {"backend": backend, "status": status, "kind": kind}
    assert bench.nothing_ran([row("reference", "ok"), row("torch", "ok")], ["torch", "reference"]) == ""
    assert bench.nothing_ran([row("reference", "ok"), row("cuda", "unavailable")], None) == ""
    assert "none of the backends asked for ran (cuda)" in bench.nothing_ran(
        [row("reference", "ok"), row("cuda", "unavailable")], ["cuda"])
    assert bench.nothing_ran([row("reference", "ok"), row("triton+compile", "ok")], ["triton"]) == ""
    assert bench.nothing_ran([row("torch", "error"), row("timm:x", "ok", "baseline")], None) == "no row ran"


@pytest.mark.parametrize("args, fragment", [
    (["--device", "bogus"], "--device bogus"), (["--threads", "-1"], "--threads -1"),
    (["--bench", "train", "--drop-path-rate", "2"], "--drop-path-rate 2"),
    (["--bench", "train", "--lr", "-1"], "--lr -1")])
def test_bad_settings_named_before_any_work(args, fragment, monkeypatch):
    """A bad value stops the run at once with the flag named (tracebacks, or rows failing one by one)."""
    bench = _load_script()
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: pytest.fail("ran with a bad setting"))
    with pytest.raises(SystemExit, match=f"error: {fragment}"):
        bench.main(["--model", "groupmixformer_m", "--img-size", "64", "--no-timm", "--quiet"] + args)


def test_cuda_device_without_one_named(monkeypatch):
    import torch
    bench = _load_script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device here"):
        bench.main(["--model", "groupmixformer_m", "--device", "cuda", "--no-timm", "--quiet"])


def test_ops_smoke_takes_the_cases_asked(tmp_path):
    """benchmarks/ops.py --smoke (CPU) times the --model / --stages / --dtype / --batch-size asked, on a
    7x7 grid, and names a bad model before any work."""
    ops = importlib.util.spec_from_file_location("gmf_benchmark_ops_smoke", REPO / "benchmarks" / "ops.py")
    mod = importlib.util.module_from_spec(ops)
    ops.loader.exec_module(mod)
    from gmf_kernels.models.configs import MODEL_CONFIGS
    seen = []
    real = mod.bench_case
    mod.bench_case = lambda case, impls, *a, **k: seen.append((dict(case), list(impls)))
    try:
        assert mod.main(["--smoke", "--model", "groupmixformer_s", "--stages", "1", "2", "--dtype", "bf16",
                         "--batch-size", "2"]) == 1          # nothing timed (bench_case replaced): not a pass
    finally:
        mod.bench_case = real
    dims = MODEL_CONFIGS["groupmixformer_s"]["embedding_dims"]
    assert [(c["model"], c["stage"], c["C"], c["H"], c["W"], c["B"], c["dtype"]) for c, _ in seen] == [
        ("groupmixformer_s", 1, dims[1], 7, 7, 2, "bf16"), ("groupmixformer_s", 2, dims[2], 7, 7, 2, "bf16")]
    assert all(set(impls) <= {"torch", "reference"} and impls for _, impls in seen)
    # the defaults: stage 0, fp32, batch 1, and a real (tiny) timing
    assert mod.main(["--smoke", "--model", "groupmixformer_t", "--impls", "torch", "reference",
                     "--rep", "1", "--warmup", "1", "--results-file", str(tmp_path / "never.csv")]) == 0
    assert not (tmp_path / "never.csv").exists()
    with pytest.raises(SystemExit):
        mod.main(["--smoke", "--model", "groupmixformer_x"])
