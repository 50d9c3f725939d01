// CPU registration of the formats family (kernels: cpp/formats).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "formats/formats_cpu.h"
#include "formats_ops.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
namespace formats = difforge::formats;

struct CpuKernels {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static void hif8(const formats::Hif8Params& p) { formats::hif8_cpu(p); }
  static void hif8_decode(const formats::Hif8DecodeParams& p) { formats::hif8_decode_cpu(p); }
  static void nvfp4_quantize(const formats::Nvfp4QuantizeParams& p) { formats::nvfp4_quantize_cpu(p); }
  static void nvfp4_dequantize(const formats::Nvfp4DequantizeParams& p) { formats::nvfp4_dequantize_cpu(p); }

  // x^ in fp32 (fake-quantized on the fly, or decoded codes), then the blocked fp32 GEMM.
  static Tensor hif8_linear(const Tensor& x, const Tensor& w_codes, const Tensor& w_scale, const OptTensor& x_scale,
                            const OptTensor& bias, at::ScalarType dtype) {
    Tensor x_hat = at::empty(x.sizes(), x.options().dtype(at::kFloat));
    if (x.scalar_type() == at::kByte) {
      formats::Hif8DecodeParams p;
      p.codes = x.data_ptr<uint8_t>();
      p.n = x.numel();
      p.scale = x_scale->data_ptr<float>();
      p.out = x_hat.data_ptr();
      formats::hif8_decode_cpu(p);
    } else {
      formats::Hif8Params p;
      p.x = x.data_ptr();
      p.dtype = difforge::binding::to_dtype(x.scalar_type());
      p.n = x.numel();
      p.target = difforge::hif8::kForwardTarget;
      p.qdq = x_hat.data_ptr();
      formats::hif8_cpu(p);
    }
    Tensor y = formats::hif8_linear_cpu(x_hat, w_codes, w_scale.data_ptr<float>());
    if (bias) y.add_(*bias);
    return y.to(dtype);
  }

  static Tensor nvfp4_linear(const Tensor& x, const Tensor& w_scales, const Tensor& w_packed, const OptTensor& w_pts,
                             const OptTensor& bias) {
    Tensor y = formats::nvfp4_linear_cpu(x.to(at::kFloat).contiguous(), w_scales, w_packed,
                                         w_pts ? w_pts->data_ptr<float>() : nullptr);
    if (bias) y.add_(*bias);
    return y.to(x.scalar_type());
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(difforge, CPU, m) { DIFFORGE_REGISTER_FORMATS_OPS(m, CpuKernels); }
