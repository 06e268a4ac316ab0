r"""Triton kernels for the eval-mode Group-Mix Attention stage qkv -> pre-projection.

Importing this package imports Triton (the backend module imports it lazily).

Modules, one job each:

* ``_common``      : small ``@triton.jit`` helpers shared by the kernels (hardswish,
                     the depthwise-stencil accumulator, the padded widths).
* ``config``       : tile sizes and the static shape of one specialisation (``GMAShape``).
* ``aggregation``  : ``gma_aggregate_kernel`` + its launcher: ONE-PASS aggregation: Q, V
                     group proxies, the per-tile online-softmax partials of K (K is never
                     written) and the local branch into channels [C', C) of ``pre``.
* ``attention``    : ``gma_combine_kernel`` (split-N combine of the partials into KV) and
                     ``gma_attention_kernel`` (``scale * Q KV + Q * CRPE(V)`` into
                     channels [0, C')), + their launchers.
* ``launcher``     : buffers, split plan and the three launches of one call.
* ``op``           : the ``gmf::triton_pre_projection`` torch.library op, its fake and
                     its autograd registration.
* ``specializations``: signatures/constexprs of given widths, for AOT compiles.

Data flow (B batch, N = H*W tokens in tiles of BLOCK_P, grouped into SPLITS runs)::

    qkv (B,N,3C) --aggregate--> q, v (B,N,C') in qkv.dtype
                           \--> part_m, part_l (B,SPLITS,C'), part_acc (B,SPLITS,C',d) fp32  [K never stored]
                           \--> pre[..., C':C] (local branch)
    part_m, part_l, part_acc --combine--> kv (B,C',d) fp32
    q, v, kv --attention--> pre[..., :C']
"""
