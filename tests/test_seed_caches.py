"""Caches compiled on the development machine for a lent GPU machine (benchmarks/seed_caches.py).

* `specializations.check_foreign_triton_key`: another Python's build of this Triton release may
  differ from this one's key in the compiled library's hash alone;
* a real kernel compiled here under a foreign key, packed, and installed into another cache, is a
  cache hit there under that key (Triton reads it, compiles nothing, writes nothing), and is not
  found under this machine's own key; the archive leaves out `.source` and `.llir`;
* `install`: the Triton archive only where the key is this machine's, once per archive; the CUDA
  build folders copied; whether this machine's CUDA build key is among them; a missing seed said;
* gpu_report.py: the seed installed after the env phase, its cubins not counted as JIT compiles,
  and summary.md's line.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest

from helpers import load_script

REPO = Path(__file__).resolve().parent.parent
sc = load_script(REPO / "benchmarks" / "seed_caches.py", "gmf_seed_caches")
gr = load_script(REPO / "benchmarks" / "gpu_report.py", "gmf_gpu_report")


def _keys():
    from triton.runtime.cache import triton_key

    from gmf_kernels.triton_kernels import specializations as S
    local = triton_key()
    parts = local.split("-")
    lib = parts.index(S._libtriton_sha256())
    return local, parts, lib


def _foreign(parts, lib, new_hash):
    return "-".join(parts[:lib] + [new_hash] + parts[lib + 1:])


def test_foreign_triton_key_only_the_library_may_differ():
    import random

    from gmf_kernels.triton_kernels import specializations as S
    local, parts, lib = _keys()
    assert S.check_foreign_triton_key(local) == local
    other = hashlib.sha256(os.urandom(16)).hexdigest()
    assert S.check_foreign_triton_key(_foreign(parts, lib, other) + "\n") == _foreign(parts, lib, other)
    i = random.choice([j for j in range(len(parts)) if j != lib])  # a Python source of Triton changed
    changed = parts[:i] + [hashlib.sha256(os.urandom(16)).hexdigest()] + parts[i + 1:]
    with pytest.raises(ValueError, match="1 parts differ"):
        S.check_foreign_triton_key("-".join(changed))
    with pytest.raises(ValueError, match="2 parts differ"):
        both = list(changed)
        both[lib] = other
        S.check_foreign_triton_key("-".join(both))
    with pytest.raises(ValueError, match="parts against"):
        S.check_foreign_triton_key("-".join(parts + [other]))
    with pytest.raises(ValueError):
        S.check_foreign_triton_key(local.replace("3.6.0", "3.7.0", 1) if local.startswith("3.6.0") else "x" + local)


_ROUND_TRIP = r"""
import json, os, sys
from pathlib import Path
from gmf_kernels.triton_kernels import specializations as S
mode, key, cache = sys.argv[1], sys.argv[2], sys.argv[3]
spec = [sp for sp in S.specializations_of_call(S.Call(40, 7, 7, 1, "fp32"), 80)
        if sp.kernel == "gma_combine_kernel"][0]
if key != "local":
    S.use_triton_key(key)
h = __import__("hashlib").sha256(S.cache_key(spec).encode()).hexdigest()
from triton.runtime.cache import _base32
entry = _base32(h)
if mode == "compile":
    os.environ["TRITON_CACHE_DIR"] = cache
    S.compile_one(spec, resources=False)
    print(json.dumps({"entry": entry}))
elif mode == "entry":
    print(json.dumps({"entry": entry}))
else:  # load: a cache hit writes nothing
    os.environ["TRITON_CACHE_DIR"] = cache
    def files():
        return {str(p): p.stat().st_mtime_ns for p in Path(cache).rglob("*") if p.is_file()}
    before = files()
    rep = S.compile_one(spec, resources=True)
    print(json.dumps({"entry": entry, "unchanged": files() == before, "ptx_lines": rep["line_info"]}))
"""


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _ROUND_TRIP, *map(str, args)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_kernel_compiled_under_a_foreign_key_is_a_cache_hit_there(tmp_path):
    _, parts, lib = _keys()
    foreign = _foreign(parts, lib, hashlib.sha256(os.urandom(16)).hexdigest())
    made = _run("compile", foreign, tmp_path / "here")
    assert (tmp_path / "here" / made["entry"]).is_dir()
    packed = sc.pack_triton_cache(tmp_path / "here", tmp_path / "seed.tar.xz")
    assert packed["entries"] == 1
    with tarfile.open(tmp_path / "seed.tar.xz") as tar:
        names = tar.getnames()
    assert not [n for n in names if n.endswith((".llir", ".source"))]
    assert {Path(n).suffix for n in names} == {".json", ".cubin", ".ptx", ".ttir", ".ttgir"}
    there = tmp_path / "there"
    assert sc.install_triton_cache(tmp_path / "seed.tar.xz", there) == {"added": 1, "already_there": 0}
    grp = json.loads(next((there / made["entry"]).glob("__grp__*.json")).read_text())["child_paths"]
    assert all(Path(p).is_file() and Path(p).parent == there / made["entry"] for p in grp.values())
    hit = _run("load", foreign, there)
    assert hit["entry"] == made["entry"] and hit["unchanged"] and hit["ptx_lines"]
    assert _run("entry", "local", there)["entry"] != made["entry"]   # this machine's key: another entry
    assert sc.install_triton_cache(tmp_path / "seed.tar.xz", there) == {"added": 0, "already_there": 1}


def _seed(tmp_path, key, cuda_folders=("k1",)):
    seed = tmp_path / "seed"
    (seed / "cuda").mkdir(parents=True)
    cache = tmp_path / "made" / "AAAA"
    cache.mkdir(parents=True)
    for n in ("k.cubin", "k.json", "k.ptx", "k.llir"):
        (cache / n).write_text(n)
    (cache / "__grp__k.json").write_text(json.dumps({"child_paths": {n: str(cache / n) for n in
                                                                     ("k.cubin", "k.json", "k.ptx", "k.llir")}}))
    sc.pack_triton_cache(tmp_path / "made", seed / "t.tar.xz")
    for f in cuda_folders:
        (seed / "cuda" / f).mkdir()
        (seed / "cuda" / f / "_gmf_cuda.so").write_bytes(b"so")
    (seed / "seed.json").write_text(json.dumps({"triton_archive": "t.tar.xz", "host": "dev",
                                                "triton_key_sha256": sc.triton_key_sha(key),
                                                "cuda_builds": list(cuda_folders)}))
    return seed


def test_install_checks_the_key_and_installs_once(tmp_path):
    seed = _seed(tmp_path, "key-A")
    tri, cuda = tmp_path / "triton", tmp_path / "cuda"
    out = sc.install(seed, tri, cuda, triton_key="key-B", cuda_key="k2")
    assert out["status"] == "ok" and "another Triton build" in out["triton"] and not tri.exists()
    assert out["cuda"] == ["k1: installed"] and out["cuda_key_matches"] is False
    # the machine's own keys are kept, so that the next seed can be built for it (--triton-key-file)
    assert out["machine_triton_key"] == "key-B" and out["machine_cuda_key"] == "k2"
    assert (cuda / "k1" / "_gmf_cuda.so").read_bytes() == b"so"
    out = sc.install(seed, tri, cuda, triton_key="key-A", cuda_key="k1")
    assert out["triton"] == {"added": 1, "already_there": 0} and out["cuda_key_matches"] is True
    assert out["cuda"] == [f"k1: already in {cuda}"]
    assert sorted(p.name for p in (tri / "AAAA").iterdir()) == ["__grp__k.json", "k.cubin", "k.json", "k.ptx"]
    assert sc.install(seed, tri, cuda, triton_key="key-A")["triton"] == "installed before (same archive)"
    assert sc.install(tmp_path / "nothing", tri, cuda, triton_key="key-A")["status"].startswith("no seed")


def test_gpu_report_installs_the_seed_after_env_and_does_not_count_it(tmp_path, monkeypatch):
    """install_seed runs seed_caches.py --install for this GPU's architecture, keeps its answer in
    report.json, and the cubins it added are not counted as the phase's JIT compiles."""
    seed = _seed(tmp_path, "key-A")
    calls = []

    def fake_run(ctx, cmd, timeout, prefix, **kw):
        calls.append([str(c) for c in cmd])
        (tmp_path / "tc" / "X").mkdir(parents=True, exist_ok=True)
        (tmp_path / "tc" / "X" / "k.cubin").write_bytes(b"c")
        line = json.dumps({"status": "ok", "triton": {"added": 1}, "cuda": ["k1: installed"],
                           "cuda_key_matches": True, "seconds": 0.5})
        return gr.RunResult(cmd, 0, "progress\n" + sc.JSON_TAG + line, 0.5)   # seed_caches' tag is the report's

    assert sc.JSON_TAG == gr.JSON_TAG

    monkeypatch.setattr(gr, "run", fake_run)
    ctx = gr.Ctx(types.SimpleNamespace(seed=str(seed)), tmp_path, lambda *a, **k: None, False,
                 {"meta": {"capability": [9, 0]}, "build": {}}, {"TRITON_CACHE_DIR": str(tmp_path / "tc")},
                 0.0, 1e12)
    ph = {"notes": []}
    gr.install_seed(ctx, ph)
    assert calls and calls[0][-4:] == ["--install", str(seed), "--arch", "90"]
    b = ctx.report["build"]["seed"]
    assert b["cubins_added"] == 1 and ph["triton_kernels_seeded"] == 1 and not ph["notes"]
    md = gr.render_summary({"meta": {}, "phases": {}, "build": {"seed": dict(b, manifest={"host": "dev"})}})
    assert ("Caches seeded from the development machine (ok; benchmarks/seed_caches.py): Triton {'added': 1}, "
            "1 cubins added; CUDA k1: installed, this machine's build key among them: True") in md
    ctx.args.seed = str(tmp_path / "none")
    gr.install_seed(ctx, ph)
    assert ctx.report["build"]["seed"]["status"].startswith("no seed here")
    ctx.args.seed = ""
    ctx.report["build"] = {}
    gr.install_seed(ctx, ph)
    assert "seed" not in ctx.report["build"]
