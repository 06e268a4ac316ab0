"""The tiny full model of ../shared/golden/tiny_model.pt: eval logits and feature maps,
and the train-mode logits and input gradient.

About the train-mode vectors: they were produced with stochastic depth ACTIVE (upstream's
class default drop_path_rate=0.2), not 0 as the spec's note says. In train mode norm4
normalises over the batch, so logits[0] + logits[1] = 2 * head(norm4.bias) whatever the
features; that sum matched while the difference did not, which points at a per-sample op.
An exhaustive search over the 2^12 keep/drop patterns of the 12 DropPath draws (3 blocks
with rate > 0, 2 residuals, 2 samples) found, for each case, one pattern that reproduces
the golden train logits to ~1e-8 (1.3e-8 and 5.6e-9; for the 96x64 case the next best
pattern was 0.22 off, relative). The test replays those draws through `Tensor.bernoulli_` (the only
random call of DropPath), so our DropPath's own scaling and its call order are under test,
and it checks that exactly 12 draws happen.
"""
import contextlib

import pytest
import torch

import gmf_kernels as gmf
from gmf_kernels.numerics import max_rel_error
from helpers import assert_close_verbose

from conftest import golden_path

# keep(1)/drop(0) per DropPath draw, in call order (block, residual att then mlp, sample)
RECOVERED_DROP_PATH_DRAWS = {
    0: (1, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1),
    1: (0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
}
GOLDEN_DROP_PATH_RATE = 0.2


@pytest.fixture(scope="module")
def cases():
    return torch.load(golden_path("tiny_model.pt"), weights_only=False)


def _model(case, backend, dtype=torch.float64, **kw):
    m = gmf.GroupMixFormer(**case["config"], backend=backend, **kw).to(dtype)
    gmf.load_checkpoint(m, case["state_dict"])
    return m


@contextlib.contextmanager
def replay_bernoulli(bits):
    it = iter(bits)
    used = []
    original = torch.Tensor.bernoulli_

    def replay(self, p=0.5, *, generator=None):
        vals = [next(it) for _ in range(self.numel())]
        used.extend(vals)
        return self.copy_(torch.tensor(vals, dtype=self.dtype).view(self.shape))

    torch.Tensor.bernoulli_ = replay
    try:
        yield used
    finally:
        torch.Tensor.bernoulli_ = original


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("idx", [0, 1], ids=["64x64", "96x64"])
def test_eval_logits_and_features(cases, idx, backend):
    c = cases[idx]
    m = _model(c, backend).eval()
    with torch.no_grad():
        final, feats = m.forward_intermediates(c["input"])
        logits = m.forward_head(final)
    assert_close_verbose(logits, c["logits"], rtol=1e-10, atol=1e-10 * c["logits"].abs().max().item(), name="logits")
    for i, (f, g) in enumerate(zip(feats, c["features"])):
        assert f.shape == g.shape, (i, f.shape, g.shape)
        assert max_rel_error(f, g) < 1e-10, (i, max_rel_error(f, g))


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("idx", [0, 1], ids=["64x64", "96x64"])
def test_eval_float32(cases, idx, backend):
    c = cases[idx]
    m = _model(c, backend, torch.float32).eval()
    with torch.no_grad():
        logits = m(c["input"].float())
    assert max_rel_error(logits, c["logits"]) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("idx", [0, 1], ids=["64x64", "96x64"])
def test_train_logits_and_input_grad(cases, idx, backend):
    c = cases[idx]
    draws = RECOVERED_DROP_PATH_DRAWS[idx]
    if draws is None:
        pytest.skip("drop-path draws of this case not recovered")
    m = _model(c, backend, drop_path_rate=GOLDEN_DROP_PATH_RATE).train()
    x = c["input"].clone().requires_grad_(True)
    with replay_bernoulli(draws) as used:
        out = m(x)
    assert len(used) == len(draws), f"DropPath drew {len(used)} values, upstream draws {len(draws)}"
    (out * c["train_loss_weight"]).sum().backward()
    assert max_rel_error(out, c["train_logits"]) < 1e-6
    assert max_rel_error(x.grad, c["train_x_grad"]) < 1e-6


@pytest.mark.parametrize("idx", [0, 1], ids=["64x64", "96x64"])
def test_train_norm4_batch_identity(cases, idx):
    """Independent of the drop-path draws: in train mode norm4 centres every channel over
    (batch, H, W), so the mean over the batch of the logits is head(norm4.bias)."""
    c = cases[idx]
    expected = c["train_logits"].mean(0)
    m = _model(c, "torch", drop_path_rate=GOLDEN_DROP_PATH_RATE).train()
    with torch.no_grad():
        out = m(c["input"])
        head_of_bias = m.head(m.norm4.bias)
    assert max_rel_error(out.mean(0), expected) < 1e-10
    assert max_rel_error(head_of_bias, expected) < 1e-10
