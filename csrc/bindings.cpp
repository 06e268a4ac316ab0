// bindings.cpp — the Python module: bindings only (the API is gma_api.h).
// pybind11 turns std::invalid_argument into ValueError and std::runtime_error into
// RuntimeError. The module holds no torch headers: addresses are plain integers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "gma_api.h"

namespace py = pybind11;

PYBIND11_MODULE(_gmf_cuda, m) {
  m.doc() = "gmf_kernels CUDA kernels for Group-Mix Attention (raw pointers; no torch dependency)";

  m.def("plan", [](int B, int H, int W, int C, int dtype, int tile_h, int tile_w, int tiles_per_cta,
                   size_t smem_limit) {
          const gmf::PlanInfo p = gmf::plan(B, H, W, C, dtype, tile_h, tile_w, tiles_per_cta, smem_limit);
          py::dict d;
          d["B"] = p.B; d["H"] = p.H; d["W"] = p.W; d["C"] = p.C;
          d["s"] = p.s; d["cp"] = p.cp; d["d"] = p.d; d["dtype"] = p.dtype; d["elem_size"] = p.elem_size;
          d["specialized_d"] = p.specialized_d;
          d["tile"] = py::make_tuple(p.tile_h, p.tile_w);
          d["tiles"] = py::make_tuple(p.tiles_y, p.tiles_x);
          d["ntiles"] = p.ntiles;
          d["tiles_per_cta"] = p.tiles_per_cta;
          d["vec"] = (bool)p.vec;
          d["smem_limit"] = p.smem_limit;
          py::list agg_cost, attn_cost;
          for (int c : p.agg_cost) agg_cost.append(c);
          for (int c : p.attn_cost) attn_cost.append(c);
          d["aggregate"] = py::dict(py::arg("grid") = p.agg_ctas, py::arg("block") = p.tile_threads,
                                    py::arg("smem") = p.agg_smem, py::arg("units") = p.agg_units,
                                    py::arg("staged") = (bool)p.agg_staged, py::arg("cost") = agg_cost);
          d["combine"] = py::dict(py::arg("grid") = p.combine_blocks, py::arg("block") = p.combine_threads,
                                  py::arg("smem") = p.combine_smem);
          d["attention"] = py::dict(py::arg("grid") = p.attn_ctas, py::arg("block") = p.tile_threads,
                                    py::arg("smem") = p.attn_smem, py::arg("units") = p.attn_units,
                                    py::arg("staged") = (bool)p.attn_staged, py::arg("cost") = attn_cost);
          d["pack"] = py::dict(py::arg("grid") = p.pack_blocks, py::arg("block") = 256);
          d["workspace"] = py::dict(py::arg("qv_offset") = p.ws_qv_offset, py::arg("part_offset") = p.ws_part_offset,
                                    py::arg("kv_offset") = p.ws_kv_offset, py::arg("packed_offset") = p.ws_packed_offset,
                                    py::arg("bytes") = p.ws_bytes);
          return d;
        },
        "Launch plan for these sizes (validates them; ValueError if unsupported). tiles_per_cta 0 and "
        "smem_limit 0 (bytes per block; default sm_90's opt-in) are automatic.",
        py::arg("B"), py::arg("H"), py::arg("W"), py::arg("C"), py::arg("dtype"),
        py::arg("tile_h") = 0, py::arg("tile_w") = 0, py::arg("tiles_per_cta") = 0, py::arg("smem_limit") = 0);

  m.def("workspace_size", &gmf::workspace_size, "Bytes of workspace pre_projection needs.",
        py::arg("B"), py::arg("H"), py::arg("W"), py::arg("C"), py::arg("dtype"),
        py::arg("tile_h") = 0, py::arg("tile_w") = 0, py::arg("tiles_per_cta") = 0, py::arg("smem_limit") = 0);

  m.def("weight_names", &gmf::weight_names, "Names and order of the folded weight pointers.");
  m.def("specialized_head_dims", &gmf::specialized_head_dims, "Head widths with compiled specialisations.");

  m.def("pre_projection", &gmf::pre_projection,
        "qkv (B,N,3C) -> pre (B,N,C) on the GPU, enqueued on `stream` (cudaStream_t as int).",
        py::arg("qkv"), py::arg("pre"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("weights"),
        py::arg("B"), py::arg("H"), py::arg("W"), py::arg("C"), py::arg("dtype"), py::arg("scale"),
        py::arg("ln_eps"), py::arg("stream"), py::arg("tile_h") = 0, py::arg("tile_w") = 0,
        py::arg("tiles_per_cta") = 0, py::arg("smem_limit") = 0, py::call_guard<py::gil_scoped_release>());

  m.def("emulate_pre_projection", &gmf::emulate_pre_projection,
        "The same kernel code run on the CPU with host pointers, every thread of a block as its own "
        "execution context, faithful to the barriers (testing without a GPU).",
        py::arg("qkv"), py::arg("pre"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("weights"),
        py::arg("B"), py::arg("H"), py::arg("W"), py::arg("C"), py::arg("dtype"), py::arg("scale"),
        py::arg("ln_eps"), py::arg("tile_h") = 0, py::arg("tile_w") = 0, py::arg("tiles_per_cta") = 0,
        py::arg("smem_limit") = 0, py::arg("seed") = 0, py::call_guard<py::gil_scoped_release>());

  m.def("emulation_info", []() {
          const gmf::EmuStats s = gmf::emu_stats();
          py::dict d;
          d["launches"] = s.launches; d["blocks"] = s.blocks; d["barriers"] = s.barriers;
          d["skipped"] = s.skipped; d["warp_ops"] = s.warp_ops; d["engine"] = s.engine; d["skip_sync"] = s.skip_sync;
          return d;
        },
        "What the CPU emulation did since loading: launches, blocks, barrier steps, barriers skipped by "
        "the compile-time GMF_EMU_SKIP_SYNC (and its value), the fiber engine.");
  m.def("emulation_selftest", &gmf::emu_selftest, "Self-tests of the emulation engine (csrc/gma_emu.cpp).",
        py::arg("name"), py::arg("seed") = 0);
  m.def("emulation_warp_mma", &gmf::emu_warp_mma,
        "One emulated warp-collective tensor-core product C (16x16) = [C +] A (16xk) B (kx16), with the "
        "operands converted to the dtype (0/1/2) and rounded as the tensor cores do (csrc/gma_mma.cuh).",
        py::arg("dtype"), py::arg("a_col_major"), py::arg("b_row_major"), py::arg("a"), py::arg("b"), py::arg("c"),
        py::arg("k"), py::arg("accumulate"));
  m.def("emulation_tf32", &gmf::emu_tf32, "The emulation's float32 -> TF32 rounding (cvt.rna.tf32.f32) of each value.",
        py::arg("values"));

  m.def("cuda_runtime_version", &gmf::cuda_runtime_version,
        "CUDA runtime the module was built with (cudaRuntimeGetVersion, e.g. 13000); 0 in an emulation-only build.");
  m.def("cuda_driver_version", &gmf::cuda_driver_version,
        "Installed CUDA driver's version (cudaDriverGetVersion, e.g. 13000); 0 without a driver. Never raises.");

  m.def("sources_hash", &gmf::build_sources_hash, "Hash of the csrc/ sources this module was built from.");
  m.def("build_key", &gmf::build_key);
  m.def("build_archs", &gmf::build_archs, "SASS architectures compiled in, e.g. '75;80;86;89;90'.");
  m.def("build_ptx_archs", &gmf::build_ptx_archs, "Architectures embedded as PTX (newer GPUs JIT it), e.g. '90'.");
  m.def("build_mode", &gmf::build_mode, "'cuda' (GPU kernels + emulation) or 'emulation' (CPU emulation only).");
  m.def("nvcc_version", &gmf::build_nvcc_version);
  m.def("build_flags", &gmf::build_flags);
  m.attr("__sources_hash__") = gmf::build_sources_hash();
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = 0, py::arg("float16") = 1, py::arg("bfloat16") = 2);
}
