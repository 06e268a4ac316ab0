r"""Triton kernels for the eval-mode Group-Mix Attention stage qkv -> pre-projection.

Importing this package imports Triton (the backend module imports it lazily).

Modules, one job each:

* ``_common``      : small ``@triton.jit`` helpers shared by the kernels (hardswish,
                     the depthwise-stencil accumulator, ``mm``: the dots, with the
                     GPU's TF32 rounding emulated under the interpreter) and the dot
                     variant of a call (``dot_variant``).
* ``config``       : tile sizes and the static shape of one specialisation (``GMAShape``);
                     per GPU architecture the dots' precision (``ARCH_DOTS``).
* ``aggregation``  : ``gma_aggregate_kernel`` + its launcher: ONE-PASS aggregation: Q, V
                     group proxies, the per-tile online-softmax partials of K (K is never
                     written) and the local branch into channels [C', C) of ``pre``.
* ``attention``    : ``gma_combine_kernel`` (split-N combine of the partials into KV) and
                     ``gma_attention_kernel`` (``scale * Q KV + Q * CRPE(V)`` into
                     channels [0, C')), + their launchers.
* ``launcher``     : buffers, split plan and the three launches of one call
                     (``plan_pre_projection``), launched under the input's device.
* ``statistics``   : ``gma_statistics_kernel`` + its launcher and op ``gmf::triton_z_moments``:
                     the training forward's BatchNorm statistics of Z from qkv in one read
                     (per-program (mean, M2), Chan's merge in float64).
* ``op``           : the ``gmf::triton_pre_projection`` torch.library op, its fake and
                     its autograd registration.
* ``specializations``: the specialisations real calls make the JIT compile (the
                     launcher's plan on meta tensors + Triton's own binder), compiled
                     ahead of time for sm_70/75/80/90 with their resource usage.

Data flow (B batch, N = H*W tokens in tiles of BLOCK_P; job j's tiles grouped into splits[j]
runs by aggregation.job_plan; R = splits[0] + ... + splits[3] packed partial rows of s = 2d channels)::

    qkv (B,N,3C) --aggregate--> q, v (B,N,C') in qkv.dtype
                           \--> part_m, part_l (B,R,s), part_acc (B,R,s,d) fp32  [K never stored]
                           \--> pre[..., C':C] (local branch)
    part_m, part_l, part_acc --combine--> kv (B,C',d) fp32
    q, v, kv --attention--> pre[..., :C']
"""
