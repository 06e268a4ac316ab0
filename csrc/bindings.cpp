// bindings.cpp — the Python module: bindings only (the API is gma_api.h).
// pybind11 turns std::invalid_argument into ValueError and std::runtime_error into
// RuntimeError. The module holds no torch headers: addresses are plain integers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "gma_api.h"

namespace py = pybind11;

PYBIND11_MODULE(_gmf_cuda, m) {
  m.doc() = "gmf_kernels CUDA kernels for Group-Mix Attention (raw pointers; no torch dependency)";

  m.def("plan", [](int B, int H, int W, int C, int dtype, int tile_h, int tile_w) {
          const gmf::PlanInfo p = gmf::plan(B, H, W, C, dtype, tile_h, tile_w);
          py::dict d;
          d["B"] = p.B; d["H"] = p.H; d["W"] = p.W; d["C"] = p.C;
          d["s"] = p.s; d["cp"] = p.cp; d["d"] = p.d; d["dtype"] = p.dtype; d["elem_size"] = p.elem_size;
          d["specialized_d"] = p.specialized_d;
          d["tile"] = py::make_tuple(p.tile_h, p.tile_w);
          d["tiles"] = py::make_tuple(p.tiles_y, p.tiles_x);
          d["ntiles"] = p.ntiles;
          d["aggregate"] = py::dict(py::arg("grid") = p.tile_blocks, py::arg("block") = p.tile_threads,
                                    py::arg("smem") = p.agg_smem);
          d["combine"] = py::dict(py::arg("grid") = p.combine_blocks, py::arg("block") = p.combine_threads,
                                  py::arg("smem") = p.combine_smem);
          d["attention"] = py::dict(py::arg("grid") = p.tile_blocks, py::arg("block") = p.tile_threads,
                                    py::arg("smem") = p.attn_smem);
          d["workspace"] = py::dict(py::arg("qv_offset") = p.ws_qv_offset, py::arg("part_offset") = p.ws_part_offset,
                                    py::arg("kv_offset") = p.ws_kv_offset, py::arg("bytes") = p.ws_bytes);
          return d;
        },
        "Launch plan for these sizes (validates them; ValueError if unsupported).",
        py::arg("B"), py::arg("H"), py::arg("W"), py::arg("C"), py::arg("dtype"),
        py::arg("tile_h") = 0, py::arg("tile_w") = 0);

  m.def("workspace_size", &gmf::workspace_size, "Bytes of workspace pre_projection needs.",
        py::arg("B"), py::arg("H"), py::arg("W"), py::arg("C"), py::arg("dtype"),
        py::arg("tile_h") = 0, py::arg("tile_w") = 0);

  m.def("weight_names", &gmf::weight_names, "Names and order of the folded weight pointers.");
  m.def("specialized_head_dims", &gmf::specialized_head_dims, "Head widths with compiled specialisations.");

  m.def("pre_projection", &gmf::pre_projection,
        "qkv (B,N,3C) -> pre (B,N,C) on the GPU, enqueued on `stream` (cudaStream_t as int).",
        py::arg("qkv"), py::arg("pre"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("weights"),
        py::arg("B"), py::arg("H"), py::arg("W"), py::arg("C"), py::arg("dtype"), py::arg("scale"),
        py::arg("ln_eps"), py::arg("stream"), py::arg("tile_h") = 0, py::arg("tile_w") = 0,
        py::call_guard<py::gil_scoped_release>());

  m.def("emulate_pre_projection", &gmf::emulate_pre_projection,
        "The same kernel code run on the CPU with host pointers (testing without a GPU).",
        py::arg("qkv"), py::arg("pre"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("weights"),
        py::arg("B"), py::arg("H"), py::arg("W"), py::arg("C"), py::arg("dtype"), py::arg("scale"),
        py::arg("ln_eps"), py::arg("tile_h") = 0, py::arg("tile_w") = 0,
        py::call_guard<py::gil_scoped_release>());

  m.def("sources_hash", &gmf::build_sources_hash, "Hash of the csrc/ sources this module was built from.");
  m.def("build_key", &gmf::build_key);
  m.def("build_archs", &gmf::build_archs);
  m.def("nvcc_version", &gmf::build_nvcc_version);
  m.def("build_flags", &gmf::build_flags);
  m.attr("__sources_hash__") = gmf::build_sources_hash();
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = 0, py::arg("float16") = 1, py::arg("bfloat16") = 2);
}
