// One layer's linear map out = x @ dequantize(W[layer]) for XLA:CPU on weights kept as integer
// codes: an XLA FFI custom call next to packed_matmul.cc, reading the same 64-column panels.
//
// Why: XLA's dot on a quantized stack first writes the layer's dequantized float matrix (a
// slice, a convert, a multiply) and then reads it, so int8 weights cost more memory traffic per
// step than float32 ones. Here each panel's codes are streamed from memory once (1 byte per
// weight, or half a byte for 4-bit), dequantized into a per-thread float scratch panel that
// stays in the L2 cache, and multiplied by the register tiles of panel_tile.h.
//
//   x       [M, K]            f32
//   codes   [L, NP, KC, 64]   s8 (KC = K) or u8 (4-bit: KC = K / 2, byte row i holds input rows
//                             2i in its low nibble and 2i + 1 in its high nibble)
//   scale   [L, NP, G, 64]    f32: w[k, n] = scale[k / group_rows, n] * code[k, n]
//   offset  [L, NP, G, 64]    f32: ... + offset[k / group_rows, n] (attr has_offset; else a
//                             dummy f32[1])
//   layer   i32[], rows i32[] as packed_matmul.cc (rows past `rows` are padding, zeroed)
//   -> out  [M, N]            f32; attrs n_out = N, group_rows = K / G

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "panel_tile.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxserve_native::kLanes;
using jaxserve_native::kPanel;
using jaxserve_native::kVecs;
using jaxserve_native::load_vec;
using jaxserve_native::panel_rows;
using jaxserve_native::parallel_for;
using jaxserve_native::vfloat;

namespace {

typedef int8_t vs8 __attribute__((vector_size(kLanes)));
typedef uint8_t vu8 __attribute__((vector_size(kLanes)));

template <typename V>
inline V load_codes(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_vec(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// panel [K, 64] floats <- one panel of codes (4-bit when kFour), group by group
template <bool kFour, bool kOffset>
void dequantize_panel(const uint8_t* codes, const float* scale, const float* offset, int64_t K,
                      int64_t group_rows, float* panel) {
  for (int64_t g = 0; g * group_rows < K; ++g) {
    vfloat s[kVecs], o[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      s[v] = load_vec(scale + g * kPanel + v * kLanes);
      o[v] = kOffset ? load_vec(offset + g * kPanel + v * kLanes) : vfloat{};
    }
    const int64_t k_end = std::min(K, (g + 1) * group_rows);
    if (kFour) {
      for (int64_t k = g * group_rows; k < k_end; k += 2) {  // byte row k / 2: rows k, k + 1
        const uint8_t* row = codes + (k / 2) * kPanel;
        for (int v = 0; v < kVecs; ++v) {
          const vu8 bytes = load_codes<vu8>(row + v * kLanes);
          const vfloat lo = __builtin_convertvector(bytes & 0xF, vfloat);
          const vfloat hi = __builtin_convertvector(bytes >> 4, vfloat);
          store_vec(panel + k * kPanel + v * kLanes, lo * s[v] + o[v]);
          store_vec(panel + (k + 1) * kPanel + v * kLanes, hi * s[v] + o[v]);
        }
      }
    } else {
      for (int64_t k = g * group_rows; k < k_end; ++k) {
        const uint8_t* row = codes + k * kPanel;
        for (int v = 0; v < kVecs; ++v) {
          const vfloat c = __builtin_convertvector(load_codes<vs8>(row + v * kLanes), vfloat);
          store_vec(panel + k * kPanel + v * kLanes, c * s[v] + o[v]);
        }
      }
    }
  }
}

template <bool kFour>
ffi::Error QuantizedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::AnyBuffer codes, ffi::Buffer<ffi::F32> scale,
                               ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::S32> layer,
                               ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out,
                               int64_t n_out, int64_t group_rows, int64_t has_offset) {
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scale.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || cd.size() != 4 || sd.size() != 4 || od.size() != 2)
    return ffi::Error::InvalidArgument("quantized_matmul: x, out rank 2; codes, scale rank 4");
  const int64_t K = xd[1], L = cd[0], NP = cd[1], G = sd[2], N = n_out;
  const int64_t KC = kFour ? K / 2 : K;
  if (cd[2] != KC || cd[3] != kPanel || sd[0] != L || sd[1] != NP || sd[3] != kPanel ||
      NP != (N + kPanel - 1) / kPanel || od[0] != xd[0] || od[1] != N || group_rows <= 0 ||
      G * group_rows != K || (kFour && group_rows % 2) ||
      (has_offset && offset.element_count() != scale.element_count()))
    return ffi::Error::InvalidArgument("quantized_matmul: shapes disagree");
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("quantized_matmul: layer out of range");
  const int64_t M = std::clamp<int64_t>(rows.typed_data()[0], 0, xd[0]);
  const uint8_t* cl = static_cast<const uint8_t*>(codes.untyped_data()) + l * NP * KC * kPanel;
  const float* sl = scale.typed_data() + l * NP * G * kPanel;
  const float* ol = has_offset ? offset.typed_data() + l * NP * G * kPanel : nullptr;
  const float* xp = x.typed_data();
  float* o = out->typed_data();
  std::memset(o + M * N, 0, sizeof(float) * (xd[0] - M) * N);
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t workers = std::max<int64_t>(pool.num_threads(), 1) - 1;
  parallel_for(pool, workers, NP, [=](int64_t p) {
    // one scratch panel per thread, reused across calls (K x 64 floats: 144 KiB at K = 576)
    thread_local std::vector<float> scratch;
    scratch.resize(K * kPanel);
    const uint8_t* cp = cl + p * KC * kPanel;
    const float* sp = sl + p * G * kPanel;
    if (ol != nullptr)
      dequantize_panel<kFour, true>(cp, sp, ol + p * G * kPanel, K, group_rows, scratch.data());
    else
      dequantize_panel<kFour, false>(cp, sp, nullptr, K, group_rows, scratch.data());
    const int64_t n0 = p * kPanel;
    panel_rows(xp, M, K, scratch.data(), o + n0, N, std::min(kPanel, N - n0));
  });
  return ffi::Error::Success();
}

}  // namespace

#define JAXSERVE_QUANTIZED_MATMUL(name, four)                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, QuantizedMatmulImpl<four>,                 \
                                ffi::Ffi::Bind()                                 \
                                    .Ctx<ffi::ThreadPool>()                      \
                                    .Arg<ffi::Buffer<ffi::F32>>()                \
                                    .Arg<ffi::AnyBuffer>()                       \
                                    .Arg<ffi::Buffer<ffi::F32>>()                \
                                    .Arg<ffi::Buffer<ffi::F32>>()                \
                                    .Arg<ffi::Buffer<ffi::S32>>()                \
                                    .Arg<ffi::Buffer<ffi::S32>>()                \
                                    .Ret<ffi::Buffer<ffi::F32>>()                \
                                    .Attr<int64_t>("n_out")                      \
                                    .Attr<int64_t>("group_rows")                 \
                                    .Attr<int64_t>("has_offset"));

JAXSERVE_QUANTIZED_MATMUL(JaxserveQuantizedMatmul8, false)
JAXSERVE_QUANTIZED_MATMUL(JaxserveQuantizedMatmul4, true)
