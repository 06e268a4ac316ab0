"""GroupMixAttention against the golden vectors of the upstream code (float64).

Every case of ../shared/golden/gma_module.pt (C = 80, 200, 40, 240 on odd grids) is
loaded strictly into `gmf_kernels.GroupMixAttention(dim, 8, qkv_bias=True)` and run on
the "reference" and "torch" backends:

* eval: output within 1e-10 (float64) and 1e-5 (float32) relative, error measured as
  max |a - e| / max |e|;
* the reference's intermediates (proxies Q/K/V, local branch, pre-projection) at 1e-10;
* train mode: output, input gradient, every parameter gradient and the BatchNorm
  buffers after the call (running statistics 1e-10, num_batches_tracked exact).
"""
import pytest
import torch

import gmf_kernels
from helpers import assert_max_rel_close
from conftest import golden_path
from gmf_kernels.reference import reference_group_mix_attention



CASES = torch.load(golden_path("gma_module.pt"), map_location="cpu", weights_only=True)
CASE_IDS = [f"C{c['dim']}-B{c['B']}-{c['H']}x{c['W']}" for c in CASES]
BACKENDS = ["reference", "torch"]

FP64_TOL = 1e-10
FP32_TOL = 1e-5


def assert_rel(actual, expected, tol, name):
    """The shared max-relative check, refusing an all-zero golden tensor (a vacuous test)."""
    assert expected.detach().abs().max().item() > 0, f"{name}: golden tensor is all zeros (test would be vacuous)"
    assert_max_rel_close(actual, expected, tol, name)


def build_module(case, backend, dtype=torch.float64):
    m = gmf_kernels.GroupMixAttention(case["dim"], 8, qkv_bias=True, backend=backend)
    assert case["num_heads"] == 8 and case["qkv_bias"] is True
    m = m.to(dtype)
    result = m.load_state_dict(case["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return m


@pytest.fixture(params=range(len(CASES)), ids=CASE_IDS)
def case(request):
    return CASES[request.param]


def test_golden_cases_cover_odd_grids_and_widths():
    """Sanity of the data the other tests rely on."""
    assert sorted(c["dim"] for c in CASES) == [40, 80, 200, 240]
    for c in CASES:
        assert c["x"].dtype == torch.float64
        assert c["x"].shape == (c["B"], c["H"] * c["W"], c["dim"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_float64(case, backend):
    m = build_module(case, backend).eval()
    x = case["x"].clone()
    with torch.no_grad():
        out = m(x, (case["H"], case["W"]))
    assert out.dtype == torch.float64
    assert_rel(out, case["out"], FP64_TOL, f"{backend} eval out")
    assert torch.equal(x, case["x"]), "forward modified its input"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_float32(case, backend):
    m = build_module(case, backend).float().eval()
    with torch.no_grad():
        out = m(case["x"].float(), (case["H"], case["W"]))
    assert out.dtype == torch.float32
    assert_rel(out, case["out"], FP32_TOL, f"{backend} float32 eval out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_does_not_touch_buffers(case, backend):
    m = build_module(case, backend).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m(case["x"], (case["H"], case["W"]))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"eval forward changed {k}"


def test_reference_intermediates(case):
    m = build_module(case, "reference").eval()
    out, extras = reference_group_mix_attention(case["x"], (case["H"], case["W"]), m.gma_weights(), m.hyper(),
                                                training=False, return_intermediates=True)
    assert_rel(out, case["out"], FP64_TOL, "reference out")
    for key in ("proxies", "local", "pre_proj"):
        assert_rel(extras[key], case[key], FP64_TOL, f"reference {key}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_float64(case, backend):
    m = build_module(case, backend).train()
    x = case["x"].clone().requires_grad_(True)
    out = m(x, (case["H"], case["W"]))
    assert_rel(out, case["train_out"], FP64_TOL, f"{backend} train out")
    (out * case["train_loss_weight"]).sum().backward()
    assert_rel(x.grad, case["train_x_grad"], FP64_TOL, f"{backend} x grad")

    params = dict(m.named_parameters())
    assert set(case["train_param_grads"]) == set(params), "golden grads and module parameters differ"
    for name, expected in case["train_param_grads"].items():
        got = params[name].grad
        assert got is not None, f"{backend}: no gradient for {name}"
        assert_rel(got, expected, FP64_TOL, f"{backend} grad {name}")

    buffers = dict(m.named_buffers())
    assert set(case["train_buffers_after"]) == set(buffers)
    for name, expected in case["train_buffers_after"].items():
        got = buffers[name]
        if name.endswith("num_batches_tracked"):
            assert got.dtype == expected.dtype and torch.equal(got, expected), \
                f"{backend} {name}: {got} != {expected}"
        else:
            # the buffers must have moved away from their loaded values ...
            assert not torch.equal(expected, case["state_dict"][name])
            assert_rel(got, expected, FP64_TOL, f"{backend} buffer {name}")
