r"""Triton kernels for the eval-mode Group-Mix Attention stage qkv -> pre-projection.

Importing this package imports Triton (the backend module imports it lazily).

Modules, one job each:

* ``_common``      : small ``@triton.jit`` helpers shared by the kernels (hardswish,
                     the depthwise-stencil accumulator, the padded widths).
* ``config``       : tile sizes and the static shape of one specialisation (``GMAShape``).
* ``aggregation``  : ONE-PASS aggregation kernel: Q, V group proxies, the per-tile
                     online-softmax partials of K (K is never written) and the local
                     branch into channels [C', C) of the pre-projection buffer.
* ``attention``    : split-N combine of the partials into KV, then
                     ``scale * Q KV + Q * CRPE(V)`` into channels [0, C').
* ``ops``          : the ``gmf::triton_pre_projection`` torch.library op (launchers).
* ``specializations``: the signatures/constexprs every model config uses (AOT compiles).

Data flow (B batch, N = H*W tokens in tiles of BLOCK_P, grouped into SPLITS runs)::

    qkv (B,N,3C) --aggregate--> Qp, Vp (B,N,C') in x.dtype
                           \--> m, l (B,SPLITS,C'), acc (B,SPLITS,C',d) fp32   [K never stored]
                           \--> pre[..., C':C] (local branch)
    m, l, acc --combine--> KV (B,C',d) fp32
    Qp, Vp, KV --attention--> pre[..., :C']
"""
