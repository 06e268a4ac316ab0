"""GPU-faithful dots under the Triton interpreter (`_common.mm` with EMULATE_DOTS).

The interpreter multiplies `tl.dot` operands in exact fp32 whatever `input_precision` says;
the GPU does not. `mm` therefore rounds the operands as the GPU does when the launchers
run under the interpreter. These tests hold the emulation to an independent NumPy model of
the GPU's arithmetic:

* TF32 conversion as PTX ``cvt.rna.tf32.f32`` (round to nearest, ties away from zero) and
  as the tensor cores read an unconverted fp32 register (truncation to 10 mantissa bits),
  modelled with frexp/floor in float64 rather than with bit masks;
* "tf32": both operands rounded by cvt.rna (mm does that before the MMA, whose truncation
  then changes nothing), one product; "tf32x3": Triton 3.6's three passes (small x big,
  big x small, NaN -> 0, big x big, then + acc); "ieee": unrounded; "bf16" / "fp16" (the
  forward kernels' DOTS16 candidates): both operands rounded to that type as torch rounds them
  (to nearest even), one product with fp32 sums.

On a CPU the emulated result must equal the model bit for bit (same fp32 products, same
NumPy sums); on a GPU the same kernel runs compiled (EMULATE_DOTS=0, the real tensor
cores) and must match the model up to the order of the fp32 sums. A Triton upgrade that
changes how it lowers these dots is caught by `test_triton_lowering_is_what_we_emulate`,
which compiles (no GPU needed) and reads the TTGIR/PTX.

Stores too: the interpreter converts fp32 to bfloat16 by truncation (and mangles subnormals),
the GPU rounds to nearest even; `_common.stored`, which every bfloat16 output of the forward
kernels goes through, must give torch's (round-to-nearest-even) bfloat16 bit for bit either way.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from gmf_kernels.triton_kernels import _common  # noqa: E402
from gmf_kernels.triton_kernels._common import DotVariant, dot_variant, mm, stored, tf32_round, tf32_truncate  # noqa: E402

INTERPRET = _common.interpreting()
DEVICE = "cpu" if INTERPRET else "cuda"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is off", allow_module_level=True)


# ---------------------------------------------------------------- the NumPy model of the GPU
def _tf32_model(x: np.ndarray, ties_away: bool) -> np.ndarray:
    """fp32 -> TF32 (11 significant bits) in float64 arithmetic: round to nearest with ties away
    from zero (cvt.rna) or truncate. Normal numbers, inf and NaN (no subnormals)."""
    x64 = x.astype(np.float64)
    m, e = np.frexp(x64)                          # x = m 2^e, 0.5 <= |m| < 1
    mag = np.abs(m) * 2.0 ** 11                   # the 11 kept bits are its integer part
    q = np.floor(mag + 0.5) if ties_away else np.floor(mag)
    out = np.ldexp(np.copysign(q, m) / 2.0 ** 11, e)
    with np.errstate(over="ignore"):
        return np.where(np.isfinite(x64), out, x64).astype(np.float32)


def model_rna(x):
    return _tf32_model(x, True)


def model_trunc(x):
    return _tf32_model(x, False)


def model_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray, precision: str) -> np.ndarray:
    """acc + a @ b as the GPU computes it (fp32 arrays; sums as NumPy's fp32 matmul)."""
    f32 = np.float32
    if precision == "ieee":
        return np.matmul(a, b, dtype=f32) + acc
    if precision in ("bf16", "fp16"):   # operands rounded to nearest even (torch's conversion), fp32 products
        dt = torch.bfloat16 if precision == "bf16" else torch.float16
        r = [torch.from_numpy(x).to(dt).float().numpy() for x in (a, b)]
        return np.matmul(r[0], r[1], dtype=f32) + acc
    if precision == "tf32":   # mm rounds the operands (cvt.rna); the MMA's truncation then changes nothing
        return np.matmul(model_trunc(model_rna(a)), model_trunc(model_rna(b)), dtype=f32) + acc
    assert precision == "tf32x3"
    a_big, b_big = model_rna(a), model_rna(b)
    a_small, b_small = model_trunc(a - a_big), model_trunc(b - b_big)
    d = np.matmul(a_small, b_big, dtype=f32) + np.zeros_like(acc)
    d = np.matmul(a_big, b_small, dtype=f32) + d
    d = np.where(np.isnan(d), f32(0), d)
    return (np.matmul(a_big, b_big, dtype=f32) + d) + acc


# ---------------------------------------------------------------- tiny kernels around the helpers
@triton.jit
def _round_kernel(x_ptr, rna_ptr, trunc_ptr, NUM: tl.constexpr):
    i = tl.arange(0, NUM)
    x = tl.load(x_ptr + i)
    tl.store(rna_ptr + i, tf32_round(x))
    tl.store(trunc_ptr + i, tf32_truncate(x))


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
               DOT_PRECISION: tl.constexpr, EMULATE_DOTS: tl.constexpr):
    m = tl.arange(0, M)
    k = tl.arange(0, K)
    n = tl.arange(0, N)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    c = tl.load(c_ptr + m[:, None] * N + n[None, :])
    tl.store(out_ptr + m[:, None] * N + n[None, :], mm(a, b, c, DOT_PRECISION, EMULATE_DOTS))


def _run_mm(a, b, c, precision):
    M, K = a.shape
    N = b.shape[1]
    dev = [torch.from_numpy(t).to(DEVICE) for t in (a, b, c)]
    out = torch.empty(M, N, dtype=torch.float32, device=DEVICE)
    _mm_kernel[(1,)](*dev, out, M=M, K=K, N=N, DOT_PRECISION=precision, EMULATE_DOTS=INTERPRET)
    return out.cpu().numpy()


def _low_bits_set(rng, shape, scale=1.0):
    """Random normal fp32 values whose 13 bits below TF32 precision are random and nonzero
    (so every conversion and truncation matters), of both signs, over a few binades."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    bits = x.view(np.uint32)
    bits = (bits & np.uint32(0xFFFFE000)) | rng.integers(1, 0x2000, size=shape, dtype=np.uint32)
    return bits.view(np.float32)


# ---------------------------------------------------------------- tests
def test_tf32_conversions_match_model():
    """tf32_round / tf32_truncate, bit for bit, on edge cases and random values."""
    f = np.float32
    edge = [1.0, -1.0, 0.0, -0.0,
            1 + 0x1000 * 2.0 ** -23, -(1 + 0x1000 * 2.0 ** -23),      # exact ties: away from zero
            1 + 0x3000 * 2.0 ** -23, 1 + 0x0FFF * 2.0 ** -23, 1 + 0x1001 * 2.0 ** -23,
            np.nextafter(f(2.0), f(0.0)),                             # all mantissa bits set: carry to 2.0
            np.finfo(np.float32).max, -np.finfo(np.float32).max,      # rounds to +-inf, truncates to finite
            np.inf, -np.inf, 3.0e-30, -7.5e20]
    rng = np.random.default_rng(1)
    x = np.concatenate([np.array(edge, dtype=f), _low_bits_set(rng, 48, 100.0)]).astype(f)
    x = np.concatenate([x, np.full(64 - len(x), 0.5, dtype=f)])
    xt = torch.from_numpy(x).to(DEVICE)
    rna, trunc = torch.empty_like(xt), torch.empty_like(xt)
    _round_kernel[(1,)](xt, rna, trunc, NUM=64)
    rna, trunc = rna.cpu().numpy(), trunc.cpu().numpy()
    np.testing.assert_array_equal(rna.view(np.uint32), model_rna(x).view(np.uint32))
    np.testing.assert_array_equal(trunc.view(np.uint32), model_trunc(x).view(np.uint32))
    assert rna[4] == f(1 + 0x2000 * 2.0 ** -23) and rna[5] == -rna[4], "ties go away from zero"
    assert np.isinf(rna[10]) and np.isfinite(trunc[10])
    # NaN stays NaN
    nan = torch.full((64,), float("nan"), device=DEVICE)
    _round_kernel[(1,)](nan, rna_t := torch.empty_like(nan), tr_t := torch.empty_like(nan), NUM=64)
    assert torch.isnan(rna_t).all() and torch.isnan(tr_t).all()


@triton.jit
def _store_kernel(x_ptr, y_ptr, EMULATE_DOTS: tl.constexpr, NUM: tl.constexpr):
    i = tl.arange(0, NUM)
    tl.store(y_ptr + i, stored(tl.load(x_ptr + i), y_ptr, EMULATE_DOTS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_stores_round_to_nearest_even(dtype):
    """`stored` = torch's conversion, bit for bit: random values over every binade, random bit
    patterns, exact ties (both signs: to even), subnormals, the largest finite values (to inf in
    bfloat16), +-0, +-inf, NaN."""
    rng = np.random.default_rng(3)
    f = np.float32
    mags = (rng.standard_normal(2048) * 10.0 ** rng.integers(-40, 38, 2048)).astype(f)
    patterns = rng.integers(0, 2 ** 32, 2048, dtype=np.uint64).astype(np.uint32).view(f)
    ties = ((rng.integers(0, 2 ** 16, 1024, dtype=np.uint32) << np.uint32(16)) | np.uint32(0x8000)).view(f)
    edge = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, np.finfo(f).max, -np.finfo(f).max, 1e-45, -1e-40,
                     1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 65519.0, 65520.0], dtype=f)
    x = np.concatenate([mags, patterns, ties, -np.abs(ties), edge])
    x = np.concatenate([x, np.zeros(8192 - len(x), dtype=f)])
    xt = torch.from_numpy(x).to(DEVICE)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _store_kernel[(1,)](xt, y, EMULATE_DOTS=INTERPRET, NUM=8192)
    expected = xt.to(dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    same = (y.view(bits) == expected.view(bits)) | (torch.isnan(y) & torch.isnan(expected))
    assert bool(same.all()), f"{int((~same).sum())} values differ from torch's {dtype}"


@pytest.mark.parametrize("precision", ["tf32", "tf32x3", "ieee", "bf16", "fp16"])
@pytest.mark.parametrize("M,K,N", [(16, 32, 16), (32, 16, 64)], ids=lambda v: str(v))
def test_emulated_dot_is_the_gpu_model(precision, M, K, N):
    """mm == the model of the GPU's arithmetic (bit for bit when interpreting; up to the
    order of the fp32 sums on a GPU), with fresh random inputs whose low bits are set."""
    rng = np.random.default_rng(M * 1000 + K + N)
    a, b = _low_bits_set(rng, (M, K)), _low_bits_set(rng, (K, N))
    c = _low_bits_set(rng, (M, N))
    got = _run_mm(a, b, c, precision)
    want = model_dot(a, b, c, precision)
    if INTERPRET:
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    else:  # real tensor cores: other summation order, 4 fp32 ulps of the accumulated magnitude
        scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64) + np.abs(c)
        assert np.max(np.abs(got - want) / scale) < 4 * 2.0 ** -24 * K


@pytest.mark.parametrize("precision,lo,hi", [("tf32", 2.0 ** -12, 2.0 ** -9), ("tf32x3", 2.0 ** -23, 2.0 ** -19)])
def test_emulated_dot_differs_from_exact_fp32(precision, lo, hi):
    """Where the bits below TF32 precision are set the GPU result is NOT the exact product.
    Inputs: fresh random positive values whose low 13 bits are 0x0FFF (just under half a TF32
    ulp: cvt.rna rounds down and the remainder, 12 significant bits, loses its last bit to
    the MMA's truncation). The GPU's error then has a sign: one pass rounds both operands down
    (~2^-10 low); three passes drop small x small and a bit of each small (~2^-21 low). The
    interpreter's plain fp32 product has no such bias, and errors 2^-24-sized. (Here cvt.rna
    rounds down like a truncation would: 0x0FFF is below the half-way point.)"""
    rng = np.random.default_rng(7)
    K = 32

    def operand(shape):
        x = np.abs(rng.standard_normal(shape)).astype(np.float32)
        return ((x.view(np.uint32) & np.uint32(0xFFFFE000)) | np.uint32(0x0FFF)).view(np.float32)

    a, b = operand((16, K)), operand((K, 16))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    got = _run_mm(a, b, np.zeros((16, 16), dtype=np.float32), precision)
    fp32 = np.matmul(a, b, dtype=np.float32)         # what the interpreter computes without emulation
    rel, rel_fp32 = (got - exact) / exact, (fp32 - exact) / exact
    assert lo < np.max(np.abs(rel)) < hi, f"{precision}: max relative error {np.max(np.abs(rel)):.3g}"
    assert np.mean(rel) < -lo, f"{precision}: mean relative error {np.mean(rel):.3g}, expected a bias below {-lo:.3g}"
    assert abs(np.mean(rel_fp32)) < lo / 2, f"fp32 product biased? {np.mean(rel_fp32):.3g}"
    assert not np.array_equal(got, fp32)


@pytest.mark.parametrize("precision,bits", [("bf16", 8), ("fp16", 11)])
def test_emulated_16bit_dot_rounds_to_nearest(precision, bits):
    """"bf16" / "fp16" round each operand to nearest (not truncate, the interpreter's own bfloat16
    conversion): on positive operands just above half an ulp of the 16-bit type a truncation would
    bias every product low; the emulated dot's error is that of round-to-nearest, unbiased within the
    type's precision, and the plain fp32 product is not what it computes."""
    rng = np.random.default_rng(11)
    K = 32

    def operand(shape):   # mantissa bits below the type's precision: just above half its ulp
        x = np.abs(rng.standard_normal(shape)).astype(np.float32) + 0.5
        drop = 24 - bits
        keep = np.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
        return ((x.view(np.uint32) & keep) | np.uint32((1 << (drop - 1)) + 1)).view(np.float32)

    a, b = operand((16, K)), operand((K, 16))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    got = _run_mm(a, b, np.zeros((16, 16), dtype=np.float32), precision)
    rel = (got - exact) / exact
    ulp = 2.0 ** -(bits - 1)
    assert np.mean(rel) > 0, "rounded down (truncation) instead of to nearest"
    assert np.max(np.abs(rel)) < 2 * ulp, f"{precision}: max relative error {np.max(np.abs(rel)):.3g}"
    assert not np.array_equal(got, np.matmul(a, b, dtype=np.float32))


def test_emulated_fp16_dot_is_not_tf32():
    """fp16 and TF32 both keep 11 significant bits of a normal value, so random inputs cannot tell
    the "fp16" emulation from the "tf32" one. These can: exact ties with an even kept bit (to nearest
    even rounds down, TF32's cvt.rna away from zero rounds up) and values below 2^-14 (fp16
    subnormals keep fewer bits, TF32 all 11). mm("fp16") = the fp16 model bit for bit (interpreter)
    and not the TF32 one."""
    rng = np.random.default_rng(5)
    K = 32

    def operand(shape):
        x = (np.abs(rng.standard_normal(shape)) + 0.25).astype(np.float32)
        bits = (x.view(np.uint32) & np.uint32(0xFFFFC000)) | np.uint32(0x1000)    # tie, kept bit 13 even
        x = bits.view(np.float32) * np.where(rng.random(shape) < 0.5, 1.0, -1.0).astype(np.float32)
        tiny = rng.random(shape) < 0.25                                          # fp16 subnormals
        return np.where(tiny, x * np.float32(2.0 ** -17), x).astype(np.float32)

    a, b = operand((16, K)), operand((K, 16))
    c = np.zeros((16, 16), dtype=np.float32)
    got = _run_mm(a, b, c, "fp16")
    assert not np.array_equal(model_dot(a, b, c, "fp16"), model_dot(a, b, c, "tf32")), "inputs do not separate them"
    want, tf32 = model_dot(a, b, c, "fp16"), model_dot(a, b, c, "tf32")
    if INTERPRET:
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    else:   # real tensor cores (other summation order): far closer to the fp16 model than to TF32's
        assert np.max(np.abs(got - want)) < 0.1 * np.max(np.abs(want - tf32))
    assert not np.array_equal(got, tf32)


def test_launchers_ask_for_emulation():
    """The launchers' dot variant: emulated under the interpreter, by dtype, and the FMA variant
    when the emulated GPU is an sm_70 (test hook _common.EMULATED_CAPABILITY)."""
    if not INTERPRET:
        pytest.skip("interpreter-only: on a GPU the variant follows the device (test_triton_arch_support.py)")
    x32, x16, xb = (torch.empty(1, dtype=d) for d in (torch.float32, torch.float16, torch.bfloat16))
    assert dot_variant(x32) == DotVariant("tf32x3", True)
    assert dot_variant(x16) == DotVariant("tf32", True)
    assert dot_variant(xb) == DotVariant("tf32", True)


_LOWERING_SCRIPT = r"""
import json, re, triton, triton.language as tl
from triton.backends.compiler import GPUTarget

@triton.jit
def k(a, b, c, PREC: tl.constexpr):
    i = tl.arange(0, 32)
    x = tl.load(a + i[:, None] * 32 + i[None, :])
    y = tl.load(b + i[:, None] * 32 + i[None, :])
    acc = tl.load(c + i[:, None] * 32 + i[None, :])
    tl.store(c + i[:, None] * 32 + i[None, :], tl.dot(x, y, acc, input_precision=PREC))

out = {}
for arch in (80, 90, 75):
    for prec in ("tf32", "tf32x3"):
        src = triton.compiler.ASTSource(fn=k, signature={"a": "*fp32", "b": "*fp32", "c": "*fp32", "PREC": "constexpr"},
                                        constexprs={"PREC": prec})
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        ttgir = ck.asm["ttgir"]
        big, small, dots, seq = {}, {}, [], []
        for line in ttgir.splitlines():
            m = re.search(r"%(\w+) = tt\.elementwise_inline_asm \"cvt\.rna\.tf32\.f32 .*?\} %(\w+)", line)
            if m:
                big[m.group(1)] = m.group(2)
                seq.append("cvt.rna")
                continue
            m = re.search(r"%(\w+) = arith\.subf %(\w+), %(\w+)", line)
            if m and big.get(m.group(3)) == m.group(2):
                small[m.group(1)] = m.group(2)
                seq.append("small")
                continue
            m = re.search(r"= tt\.dot %(\w+), %(\w+), %(\w+), inputPrecision = (\w+)", line)
            if m:
                role = lambda v: ("big", big[v]) if v in big else ("small", small[v]) if v in small else ("raw", v)
                dots.append([role(m.group(1)), role(m.group(2)), m.group(4)])
                seq.append("dot")
                continue
            for op in ("arith.cmpf uno", "arith.select", "arith.addf"):
                if op in line and "tensor<32x32x" in line:
                    seq.append(op.split(" ")[0])
        out[f"{arch}_{prec}"] = {"dots": dots, "seq": seq, "ptx_cvt_rna": ck.asm["ptx"].count("cvt.rna.tf32.f32"),
                                 "ptx_mma_tf32": ck.asm["ptx"].count(".tf32.tf32.f32"),
                                 "ptx_fma": ck.asm["ptx"].count("fma.rn.f32")}
from gmf_kernels.triton_kernels._common import mm

@triton.jit
def k16(a, b, c, PREC: tl.constexpr):
    i = tl.arange(0, 32)
    x = tl.load(a + i[:, None] * 32 + i[None, :])
    y = tl.load(b + i[:, None] * 32 + i[None, :])
    acc = tl.load(c + i[:, None] * 32 + i[None, :])
    tl.store(c + i[:, None] * 32 + i[None, :], mm(x, y, acc, PREC, False))

for prec in ("bf16", "fp16"):
    src = triton.compiler.ASTSource(fn=k16, signature={"a": "*fp32", "b": "*fp32", "c": "*fp32", "PREC": "constexpr"},
                                    constexprs={"PREC": prec})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    out[f"90_mm_{prec}"] = {"ptx_cvt_rna": ptx.count("cvt.rna.tf32.f32"), "ptx_mma_tf32": ptx.count(".tf32.tf32.f32"),
                            "ptx_mma_16": ptx.count(f"m16n8k16.row.col.f32.{prec[0]}{prec[1:]}".replace("fp16", "f16")),
                            "ptx_cvt_rn_16": ptx.count("cvt.rn.bf16x2.f32") + ptx.count("cvt.rn.f16x2.f32")}
print(json.dumps(out))
"""


def test_triton_lowering_is_what_we_emulate(tmp_path):
    """The installed Triton lowers the dots as `mm`'s emulation assumes (compiled here, no GPU):
    sm_80/90 "tf32": fp32 registers straight into mma .tf32 (no conversion, so the tensor
    cores truncate); "tf32x3": big = cvt.rna, small = x - big, dots small x big, big x small,
    NaN -> 0, big x big, then + acc; sm_75: FMAs, no tensor cores, whatever the precision; `mm`'s
    "bf16" / "fp16" on sm_90: cvt.rn to the 16-bit type, m16n8k16 MMAs of it, no TF32 anywhere."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    script = tmp_path / "lowering.py"                    # @triton.jit needs its source in a file
    script.write_text(_LOWERING_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's NVIDIA backend / ptxas is not available")
    assert lines, f"lowering script failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    res = json.loads(lines[-1])
    for arch in (80, 90):
        one = res[f"{arch}_tf32"]
        assert one["ptx_cvt_rna"] == 0 and one["ptx_mma_tf32"] > 0, one
        three = res[f"{arch}_tf32x3"]
        assert three["seq"] == ["cvt.rna", "small", "cvt.rna", "small", "dot", "dot", "arith.cmpf", "arith.select",
                                "dot", "arith.addf"], three
        (a1, b1, p1), (a2, b2, p2), (a3, b3, p3) = three["dots"]
        assert [a1[0], b1[0], a2[0], b2[0], a3[0], b3[0]] == ["small", "big", "big", "small", "big", "big"], three
        assert a1[1] == a2[1] == a3[1] != b1[1] == b2[1] == b3[1], "operands of A and of B each split once"
        assert p1 == p2 == p3 == "tf32"
    for prec in ("tf32", "tf32x3"):
        r = res[f"75_{prec}"]
        assert r["ptx_mma_tf32"] == 0 and r["ptx_cvt_rna"] == 0 and r["ptx_fma"] > 0, r
    for prec in ("bf16", "fp16"):   # `mm`'s 16-bit operands: converted to nearest, 16-bit MMAs, no TF32
        r = res[f"90_mm_{prec}"]
        assert r["ptx_mma_16"] > 0 and r["ptx_cvt_rn_16"] > 0 and r["ptx_mma_tf32"] == 0 and r["ptx_cvt_rna"] == 0, r
