// CPU dequantization of GPTQ-packed codes in one pass: W[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n].
//
// The pure-torch reference (kernels/reference.py) needs four passes over the codes and the result (unpack,
// subtract, convert, scale); this loop reads each int32 word once and writes each weight once, like
// bitsandbytes' CPU NF4 dequantize. Bit-equal to the reference: (q - z) is exact in every float type,
// the product is computed in fp32 and rounded once to the output type.
//
// Layout (kernels/packing.py): qweight int32 [K * bits / 32, N], element k of a word at bit bits * (k % per_word);
// 3-bit planar: a 2-bit plane [K / 16, N] of the low bits, then a 1-bit plane [K / 32, N] of the high bit.
// scales fp32 [G, N], zeros int32 [G, N]; the group size is a multiple of 32 (whole words per group).
// Work is split over tiles of 16 output rows: each word row is read as 16 contiguous words.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kTile = 16;

template <typename out_t>
inline out_t scaled(uint32_t code, int32_t zero, float scale) {
  return static_cast<out_t>(static_cast<float>(static_cast<int32_t>(code) - zero) * scale);
}

template <typename out_t, int bits>
void dequantize_words(const int32_t* words, const float* scales, const int32_t* zeros, int64_t n, int64_t k,
                      int64_t group, out_t* out) {
  constexpr int per_word = 32 / bits;
  constexpr uint32_t mask = (1u << bits) - 1u;
  const int64_t rows = k / per_word;
  at::parallel_for(0, (n + kTile - 1) / kTile, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kTile, n1 = std::min(n, n0 + kTile);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t c = r * per_word, g = c / group;
        for (int64_t row = n0; row < n1; ++row) {
          const uint32_t word = static_cast<uint32_t>(words[r * n + row]);
          const float scale = scales[g * n + row];
          const int32_t zero = zeros[g * n + row];
          out_t* o = out + row * k + c;
          for (int j = 0; j < per_word; ++j) o[j] = scaled<out_t>((word >> (bits * j)) & mask, zero, scale);
        }
      }
    }
  });
}

template <typename out_t>
void dequantize_planar3(const int32_t* words, const float* scales, const int32_t* zeros, int64_t n, int64_t k,
                        int64_t group, out_t* out) {
  const int32_t* high_plane = words + (k / 16) * n;
  const int64_t chunks = k / 32;  // 32 codes: two words of the low plane, one of the high plane
  at::parallel_for(0, (n + kTile - 1) / kTile, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kTile, n1 = std::min(n, n0 + kTile);
      for (int64_t r = 0; r < chunks; ++r) {
        const int64_t c = r * 32, g = c / group;
        for (int64_t row = n0; row < n1; ++row) {
          const uint32_t low0 = static_cast<uint32_t>(words[(2 * r) * n + row]);
          const uint32_t low1 = static_cast<uint32_t>(words[(2 * r + 1) * n + row]);
          const uint32_t high = static_cast<uint32_t>(high_plane[r * n + row]);
          const float scale = scales[g * n + row];
          const int32_t zero = zeros[g * n + row];
          out_t* o = out + row * k + c;
          for (int j = 0; j < 16; ++j) o[j] = scaled<out_t>(((low0 >> (2 * j)) & 3u) | (((high >> j) & 1u) << 2), zero, scale);
          for (int j = 0; j < 16; ++j) o[16 + j] = scaled<out_t>(((low1 >> (2 * j)) & 3u) | (((high >> (16 + j)) & 1u) << 2), zero, scale);
        }
      }
    }
  });
}

torch::Tensor dequantize(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                         int64_t group, torch::Tensor out) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kInt && qweight.is_contiguous(),
              "qweight must be a contiguous int32 CPU tensor");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "scales must be contiguous fp32");
  TORCH_CHECK(zeros.scalar_type() == at::kInt && zeros.is_contiguous(), "zeros must be contiguous int32");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "out must be a contiguous [N, K] tensor");
  const int64_t n = out.size(0), k = out.size(1);
  TORCH_CHECK(qweight.size(1) == n && qweight.size(0) * 32 == k * bits, "qweight shape does not match out");
  TORCH_CHECK(group % 32 == 0 && k % group == 0 && scales.size(0) == k / group && scales.size(1) == n &&
              zeros.sizes() == scales.sizes(), "scales/zeros must be [K / group, N] with group a multiple of 32");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "eora_ft_dequantize_cpu", [&] {
    const int32_t* w = qweight.data_ptr<int32_t>();
    const float* s = scales.data_ptr<float>();
    const int32_t* z = zeros.data_ptr<int32_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    switch (bits) {
      case 2: dequantize_words<scalar_t, 2>(w, s, z, n, k, group, o); break;
      case 3: dequantize_planar3<scalar_t>(w, s, z, n, k, group, o); break;
      case 4: dequantize_words<scalar_t, 4>(w, s, z, n, k, group, o); break;
      case 8: dequantize_words<scalar_t, 8>(w, s, z, n, k, group, o); break;
      default: TORCH_CHECK(false, "bits must be 2, 3, 4 or 8, got ", bits);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize", &dequantize, "dequantize GPTQ-packed codes into out [N, K] (one pass)");
}
