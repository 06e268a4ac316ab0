"""Test configuration.

Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors: the
switch must be set before anything imports triton, so it is set here.

GPU tests: no silent skip on a GPU machine.

* A test is a *GPU test* when it is marked ``gpu`` or carries a ``skipif`` whose reason
  says it needs a GPU (e.g. ``needs a CUDA GPU``); such tests get the ``gpu`` marker at
  collection, so ``pytest -m gpu`` selects every one of them.
* On a machine with a CUDA GPU, a GPU test that skips because the CUDA module is not built
  (or stale) FAILS, naming the build command: the README's install may skip the build
  (``GMF_SKIP_CUDA_BUILD=1``), and a green run that never launched a CUDA kernel would be
  a lie.
* ``GMF_REQUIRE_GPU=1`` turns every skip of a GPU test, and every skip whose reason is a
  missing GPU / CUDA / CUDA module, into a failure (on a CPU machine they then fail): the
  mode of the GPU report (benchmarks/gpu_report.py).
"""
import os
import re
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import interpreter_speed  # noqa: E402  (after TRITON_INTERPRET is set)

if interpreter_speed.wanted():
    interpreter_speed.install()   # two costs of the interpreter that compute nothing (its docstring)

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

GOLDEN_DIR = os.environ.get(
    "GMF_GOLDEN_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "golden"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

BUILD_COMMAND = "python -m gmf_kernels.cuda build"
#: skip reasons that mean "there is no GPU / CUDA here"
GPU_ABSENT = re.compile(r"needs a (CUDA )?GPU|no CUDA (device|GPU)|torch\.cuda\.is_available\(\) is False|"
                        r"torch is built without CUDA|CUDA device required", re.IGNORECASE)
#: skip reasons that mean "the CUDA module is not built / not loadable"
MODULE_MISSING = re.compile(r"CUDA module (is )?not built|CUDA extension not available|CUDA module .*stale",
                            re.IGNORECASE)


def require_gpu() -> bool:
    """GMF_REQUIRE_GPU, read as the library's switches are (`GMF_REQUIRE_GPU=false` is off; a bad value refused)."""
    from gmf_kernels._env import env_flag
    return env_flag("GMF_REQUIRE_GPU")


def golden_required() -> bool:
    """In CI (environment variable CI set, as CI services and .ci/run do) or with
    GMF_REQUIRE_GOLDEN=1 a missing golden vector fails; elsewhere its tests skip."""
    return any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no")
               for v in ("CI", "GMF_REQUIRE_GOLDEN"))


def golden_path(name: str) -> str:
    """Path of a golden-vector file (outputs of the upstream code, kept outside the repository
    in shared/golden, or GMF_GOLDEN_DIR). Absent: the calling test, or the whole module when
    called at import, skips with a message saying where the file was looked for; in CI
    (`golden_required()`) that fails loudly instead."""
    path = os.path.join(GOLDEN_DIR, name)
    if not os.path.exists(path):
        where = (f"golden vector file {os.path.normpath(path)} not found: set GMF_GOLDEN_DIR to the directory "
                 f"holding gma_module.pt, tiny_model.pt and state_dict_manifest.json")
        if golden_required():
            pytest.fail(f"{where} (CI / GMF_REQUIRE_GOLDEN=1: the golden tests must run)", pytrace=False)
        pytest.skip(f"{where}; the golden tests skip (CI fails instead)", allow_module_level=True)
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """Many small convolutions and GEMMs: on a 2-core CI machine one intra-op thread is
    faster and far steadier than two fighting over busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ GPU tests: no silent skip
def _mark_reason(mark) -> str:
    return str(mark.kwargs.get("reason", mark.args[1] if len(mark.args) > 1 else ""))


def is_gpu_skipif(mark) -> bool:
    """A skipif mark whose reason says the test needs a GPU."""
    return bool(GPU_ABSENT.search(_mark_reason(mark)))


def skip_verdict(reason: str, gpu_test: bool, require: bool, cuda_available: bool):
    """The failure message for a skipped test, or None when the skip stands.

    reason: the skip's reason; gpu_test: the item is a GPU test (marked `gpu`);
    require: GMF_REQUIRE_GPU=1; cuda_available: torch.cuda.is_available()."""
    module_missing = bool(MODULE_MISSING.search(reason))
    gpu_absent = bool(GPU_ABSENT.search(reason))
    if require and (gpu_test or module_missing or gpu_absent):
        hint = f" (build it with `{BUILD_COMMAND}`)" if module_missing and BUILD_COMMAND not in reason else ""
        return (f"GMF_REQUIRE_GPU=1: a GPU test may not skip, but it skipped: {reason}{hint}"
                if gpu_test else f"GMF_REQUIRE_GPU=1: skipped for want of a GPU / CUDA: {reason}{hint}")
    if cuda_available and gpu_test and module_missing:
        return (f"this machine has a CUDA GPU but the CUDA module cannot be loaded, so this GPU test would "
                f"skip silently: {reason}. Build it with `{BUILD_COMMAND}` (or install without "
                f"GMF_SKIP_CUDA_BUILD=1)")
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (GMF_REQUIRE_GPU=1: skipping fails)")
    config.addinivalue_line("markers", "xdist_group(name): run in one pytest-xdist worker with --dist loadgroup")
    if not hasattr(config, "workerinput"):
        # the random-shape tests' seed, drawn once by the controlling process so that every
        # pytest-xdist worker (they inherit the environment) collects the same draws
        os.environ.setdefault("GMF_RANDOM_SEED", str(time.time_ns() % 1_000_000))


#: test files that take minutes on a 2-core CI machine (the AOT compiles, the CUDA build, Inductor):
#: collected first, so that `pytest -n 2 --dist loadfile` (README, CI) starts them first instead
#: of leaving one of them to run alone at the end
LONG_FILES = ("test_triton_compile.py", "test_cuda_build.py", "test_whole_model_compile.py", "test_cuda_sm70.py",
              "test_triton_training.py", "test_backends_parity.py", "test_cuda_emulation.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") is None and any(is_gpu_skipif(m) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))   # stable: file order kept otherwise


def _skip_reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2]).removeprefix("Skipped: ")
    return str(lr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    verdict = skip_verdict(_skip_reason(report), item.get_closest_marker("gpu") is not None, require_gpu(),
                           torch.cuda.is_available())
    if verdict is not None:
        report.outcome = "failed"
        report.longrepr = verdict


#: a failing test's first assertion lines, printed the moment pytest learns of the failure (under
#: GMF_REQUIRE_GPU=1: the GPU report's test runs): with pytest-xdist the tracebacks only come at the
#: session's end, which a run stopped by its time never reaches (the first H200 report lost all 4)
FAILURE_TAG = "GMF_TEST_FAILURE "


def failure_line(nodeid: str, longrepr: str) -> str:
    """FAILURE_TAG, the test id, a tab (ids may hold spaces) and the failure's `E` lines (or its last line),
    one line of <= 600 chars."""
    lines = [ln[1:].strip() for ln in str(longrepr).splitlines() if ln.startswith("E ")]
    msg = " | ".join(lines) if lines else (str(longrepr).strip().splitlines() or [""])[-1]
    return f"{FAILURE_TAG}{nodeid}\t{' '.join(msg.split())[:600]}"


def pytest_runtest_logreport(report):
    if require_gpu() and report.failed:
        print("\n" + failure_line(report.nodeid, report.longreprtext), flush=True)


def pytest_report_header(config):
    seed = f"gmf_kernels: random shapes drawn with GMF_RANDOM_SEED={os.environ.get('GMF_RANDOM_SEED')} (set it to replay)"
    if torch.cuda.is_available():
        try:
            import gmf_kernels.cuda as gcuda
            mod = f"CUDA module: {gcuda.loaded_path()}" if gcuda.is_available() else \
                f"CUDA module NOT loadable: GPU tests fail until `{BUILD_COMMAND}`"
        except Exception as e:  # pragma: no cover - a broken install
            mod = f"CUDA module: error {type(e).__name__}: {e}"
        return [f"gmf_kernels: GPU {torch.cuda.get_device_name(0)}; {mod}; GMF_REQUIRE_GPU={int(require_gpu())}", seed]
    return ["gmf_kernels: no CUDA GPU: GPU tests skip"
            + (" -> GMF_REQUIRE_GPU=1 turns those skips into failures" if require_gpu() else ""), seed]


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """An empty tuning-table folder (GMF_TUNING_DIR) for the test, with the table cache cleared."""
    from gmf_kernels import tuning
    monkeypatch.setenv("GMF_TUNING_DIR", str(tmp_path))
    tuning.clear_cache()
    yield tmp_path
    tuning.clear_cache()


# ------------------------------------------------------------------ the CPU emulation of the CUDA kernels
def skip_or_fail_in_ci(msg: str) -> None:
    """A tool a test needs is missing: skip with msg here; fail in CI (environment variable CI
    set), which must run the test."""
    if os.environ.get("CI"):
        pytest.fail(msg + " (CI must run this test)")
    pytest.skip(msg)


def _emulation_toolchain_missing() -> str:
    """Why an emulation-only build of csrc/ cannot run here ("" when it can)."""
    from gmf_kernels.cuda import build as cbuild
    try:
        cbuild.find_cxx()
        cbuild.find_ninja()
        cbuild.pybind11_include()
        cbuild.cuda_include_dir()
    except cbuild.BuildError as e:
        return str(e)
    return ""


@pytest.fixture(scope="session")
def emu_build(tmp_path_factory):
    """Emulation-only build of the current csrc/ (host C++ compiler, no nvcc; about a minute on
    2 cores), once per run: (module path, its build directory, seconds). Under pytest-xdist the
    workers share it (in the run's temporary directory, behind a file lock: the first builds, the
    others load that build; each built its own until 2026-12-06, ~50 s more on 2 cores). A
    missing toolchain skips, and fails in CI (environment variable CI set)."""
    import time
    from pathlib import Path

    from gmf_kernels.cuda import build as cbuild
    why = _emulation_toolchain_missing()
    if why:
        skip_or_fail_in_ci(f"cannot build the CPU emulation of the CUDA kernels: {why}")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent                  # this run's directory, above each worker's own
    out = base / "gmf_emulation"
    t0 = time.time()
    try:
        import fcntl
    except ImportError:                     # no flock (Windows): a build of this process's own
        fcntl, out = None, tmp_path_factory.mktemp("gmf_emulation")
    # the module's path once built: `build` into an explicit out_dir always runs the compile step, which
    # would relink the module another worker has loaded
    done = out / "built_by_this_run.txt"
    with open(base / "gmf_emulation.fixture.lock", "a") as lock:   # not build()'s own lock file
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if fcntl is not None and done.is_file() and Path(done.read_text()).is_file():
            path = done.read_text()
        else:
            path = cbuild.build(out_dir=out, emulation_only=True, quiet=True)
            done.write_text(str(path))
    return Path(path), out / ".build", time.time() - t0


@pytest.fixture(scope="session")
def emu(emu_build):
    """The emulation build, loaded."""
    import gmf_kernels.cuda as gcuda
    return gcuda.load_from(emu_build[0])


@pytest.fixture
def use_emu(emu, monkeypatch):
    """Make gmf_kernels.cuda.load() (so the launcher and the op) use the emulation build."""
    import gmf_kernels.cuda as gcuda
    monkeypatch.setattr(gcuda, "_loaded", emu)
    return emu

