// CUDA registration of the formats family (kernels: cuda/formats, torch-free launchers). The HiF8 GEMM maps
// both operands exactly onto E4M3 (spec §3) and runs cuBLASLt's FP8 GEMM through torch._scaled_mm.
#include <ATen/ops/_scaled_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "difforge/formats_cuda.h"
#include "formats_ops.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
namespace formats = difforge::formats;

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "difforge ", what, " kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// An operand of the FP8 GEMM: E4M3 values and the fp32 scale that multiplies them back.
struct E4m3Operand {
  Tensor values, scale_inv;
};

E4m3Operand e4m3_from_codes(const Tensor& codes, const Tensor& scale) {
  E4m3Operand out{at::empty(codes.sizes(), codes.options().dtype(at::kFloat8_e4m3fn)),
                  at::empty({}, codes.options().dtype(at::kFloat))};
  const Tensor scratch = at::zeros({1}, codes.options().dtype(at::kInt));
  formats::Hif8ToE4m3Params p;
  p.codes = codes.data_ptr<uint8_t>();
  p.n = codes.numel();
  p.scale = scale.data_ptr<float>();
  p.e4m3 = static_cast<uint8_t*>(out.values.data_ptr());
  p.e4m3_scale_inv = out.scale_inv.data_ptr<float>();
  p.scratch = reinterpret_cast<uint32_t*>(scratch.data_ptr<int>());
  check_launch(formats::launch_hif8_to_e4m3(p, current_stream()), "hif8_to_e4m3");
  return out;
}

// Float activations: the recipe's per-tensor quantization (amax -> 15) straight into E4M3.
E4m3Operand e4m3_from_float(const Tensor& x) {
  E4m3Operand out{at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn)),
                  at::empty({}, x.options().dtype(at::kFloat))};
  const Tensor scratch = at::zeros({1}, x.options().dtype(at::kInt));
  formats::Hif8Params p;
  p.x = x.data_ptr();
  p.dtype = difforge::binding::to_dtype(x.scalar_type());
  p.n = x.numel();
  p.target = difforge::hif8::kForwardTarget;
  p.e4m3 = static_cast<uint8_t*>(out.values.data_ptr());
  p.shift = difforge::hif8::e4m3_shift_for_target(p.target);
  p.e4m3_scale_inv = out.scale_inv.data_ptr<float>();
  p.scratch = reinterpret_cast<uint32_t*>(scratch.data_ptr<int>());
  check_launch(formats::launch_hif8(p, current_stream()), "hif8");
  return out;
}

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;
  static void hif8(const formats::Hif8Params& p) { check_launch(formats::launch_hif8(p, current_stream()), "hif8"); }
  static void hif8_decode(const formats::Hif8DecodeParams& p) {
    check_launch(formats::launch_hif8_decode(p, current_stream()), "hif8_decode");
  }
  static void nvfp4_quantize(const formats::Nvfp4QuantizeParams& p) {
    check_launch(formats::launch_nvfp4_quantize(p, current_stream()), "nvfp4_quantize");
  }
  static void nvfp4_dequantize(const formats::Nvfp4DequantizeParams& p) {
    check_launch(formats::launch_nvfp4_dequantize(p, current_stream()), "nvfp4_dequantize");
  }

  // FP8 tensor cores with fp32 accumulation (no fast accumulation: training numerics), scales in the epilogue.
  static Tensor hif8_linear(const Tensor& x, const Tensor& w_codes, const Tensor& w_scale, const OptTensor& x_scale,
                            const OptTensor& bias, at::ScalarType dtype) {
    const E4m3Operand a = x.scalar_type() == at::kByte ? e4m3_from_codes(x, *x_scale) : e4m3_from_float(x);
    const E4m3Operand b = e4m3_from_codes(w_codes, w_scale);
    Tensor y = at::_scaled_mm(a.values, b.values.t(), a.scale_inv, b.scale_inv, std::nullopt, std::nullopt, dtype,
                              /*use_fast_accum=*/false);
    if (bias) y.add_(*bias);
    return y;
  }

  static Tensor nvfp4_linear(const Tensor& x, const Tensor& w_scales, const Tensor& w_packed, const OptTensor& w_pts,
                             const OptTensor& bias) {
    const int64_t n = w_packed.size(0);
    Tensor y = at::empty({x.size(0), n}, x.options());
    const Tensor b = bias ? bias->to(x.scalar_type()).contiguous() : Tensor();
    formats::Nvfp4LinearParams p;
    p.x = x.data_ptr();
    p.dtype = difforge::binding::to_dtype(x.scalar_type());
    p.m = x.size(0);
    p.n = n;
    p.k = x.size(1);
    p.x_row_stride = x.stride(0);
    p.w_scales = static_cast<const uint8_t*>(w_scales.data_ptr());
    p.w_packed = w_packed.data_ptr<uint8_t>();
    p.w_pts = w_pts ? w_pts->data_ptr<float>() : nullptr;
    p.bias = bias ? b.data_ptr() : nullptr;
    p.out = y.data_ptr();
    check_launch(formats::launch_nvfp4_linear(p, current_stream()), "nvfp4_linear");
    return y;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(difforge, CUDA, m) { DIFFORGE_REGISTER_FORMATS_OPS(m, CudaKernels); }
