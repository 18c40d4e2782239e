// One layer's linear map out = x @ dequantize(W[layer]) for XLA:CPU on weights kept as integer
// codes: an XLA FFI custom call next to packed_matmul.cc, reading the same 64-column panels.
//
// Why: XLA's dot on a quantized stack first writes the layer's dequantized float matrix (a
// slice, a convert, a multiply) and then reads it, so int8 weights cost more memory traffic per
// step than float32 ones. Here each panel's codes are streamed from memory once (1 byte per
// weight, or half a byte for 4-bit). Up to one register tile of rows (6) they are dequantized
// in registers and multiplied at once; with more rows, into a per-thread float scratch panel
// that stays in L2 and is read by the register tiles of panel_tile.h. benchmarks/
// quantized_matmul.py (a 30-layer scan of 576 x 1536 on the 2-core dev machine), ms at
// 1 / 16 / 64 / 256 rows: float32 panels 3.1 / 4.8 / 14.1 / 39.0, int8 1.2 / 5.0 / 14.6 /
// 37.8, fp8 2.9 / 6.3 / 13.1 / 39.9, 4-bit 1.4 / 4.7 / 12.8 / 40.9; XLA's dot on the int8
// stack 3.3 / 7.0 / 24.9 / 52.6.
//
//   x       [M, K]            f32
//   codes   [L, NP, KC, 64]   s8 or f8e4m3fn (KC = K), or u8 (4-bit: KC = K / 2, byte row i
//                             holds input rows 2i in its low nibble and 2i + 1 in its high one)
//   scale   [L, NP, G, 64]    f32 or f16: w[k, n] = scale[k / group_rows, n] * code[k, n]
//   offset  [L, NP, G, 64]    f32 or f16: ... + offset[k / group_rows, n] (attr has_offset;
//                             else a dummy f32[1]). float16 as the checkpoint stores it (GGUF's
//                             legacy blocks, GPTQ, AWQ): converted per group, never widened in
//                             memory, so the memory plan's bytes are what is held.
//   layer   i32[], rows i32[] as packed_matmul.cc (rows past `rows` are padding, zeroed)
//   -> out  [M, N]            f32; attrs n_out = N, group_rows = K / G

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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
typedef int32_t vi32 __attribute__((vector_size(kLanes * sizeof(int32_t))));

enum class Codes { kS8, kU4, kF8 };  // int8; two 4-bit codes per byte; float8 e4m3fn

// an unaligned 16-byte vector load (a memcpy into the vector here became two 8-byte scalar
// loads and a per-byte sign extension)
template <typename V>
inline V load_codes(const void* p) {
  typedef V unaligned __attribute__((aligned(1)));
  return *static_cast<const unaligned*>(p);
}

inline void store_vec(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// 16 bytes -> 16 floats through int32. GCC 12 scalarizes a direct int8 -> float convertvector
// (16 vcvtsi2ss: a 30-layer 576 x 1536 int8 scan at 1 row took 5.5 ms against 3.7 for float32);
// via int32 an unsigned one is one vpmovzxbd and one vcvtdq2ps, but a signed one loaded from
// memory still became 16 movsbl, hence the AVX-512 intrinsics for it.
template <typename V>
inline vfloat to_float(V bytes) {
  return __builtin_convertvector(__builtin_convertvector(bytes, vi32), vfloat);
}

inline vfloat load_s8_as_float(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vfloat>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
#else
  return to_float(load_codes<vs8>(p));
#endif
}

// 16 float8 e4m3fn codes -> floats, exactly: sign, 4 exponent bits (bias 7), 3 mantissa bits;
// exponent 0 is subnormal (m * 2^-9), S.1111.111 is NaN, and there are no infinities.
// With AVX-512 the code's bits shifted into a float16 (exponent bias 15) are the value / 2^8,
// subnormals included, and vcvtph2ps converts them (unaffected by denormals-are-zero); the bit
// arithmetic below is the portable way (about twice the instructions).
typedef uint16_t vu16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));

inline vfloat fp8_to_float(vu8 bytes) {
#if defined(__AVX512F__)
  const vu16 u = __builtin_convertvector(bytes, vu16);
  const vu16 half = ((u & 0x7F) << 7) | ((u & 0x80) << 8);
  __m256i h;
  std::memcpy(&h, &half, sizeof h);
  const __m512 f = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f));
  const __mmask16 nan = _mm512_cmpeq_epi32_mask(
      _mm512_and_si512(_mm512_cvtepu8_epi32(reinterpret_cast<__m128i>(bytes)),
                       _mm512_set1_epi32(0x7F)),
      _mm512_set1_epi32(0x7F));
  return reinterpret_cast<vfloat>(_mm512_mask_mov_ps(f, nan, _mm512_set1_ps(NAN)));
#else
  const vi32 u = __builtin_convertvector(bytes, vi32);
  const vi32 sign = (u & 0x80) << 24, e = (u >> 3) & 0xF, m = u & 0x7;
  const vi32 normal = sign | ((e + (127 - 7)) << 23) | (m << 20);
  vfloat sub = __builtin_convertvector(m, vfloat) * (1.0f / 512);  // int32 -> float: vector
  vi32 sub_bits;
  std::memcpy(&sub_bits, &sub, sizeof sub);
  sub_bits |= sign;
  const vi32 is_sub = e == 0, is_nan = (e == 0xF) & (m == 0x7);  // lanes of all ones or zero
  vi32 bits = (normal & ~is_sub) | (sub_bits & is_sub);
  bits = (bits & ~is_nan) | ((vi32{} + 0x7FC00000) & is_nan);
  vfloat out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
#endif
}

inline float half_to_float(uint16_t h) {  // IEEE binary16, subnormals included
  const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
  float x;
  if (e == 0) {
    x = std::ldexp(static_cast<float>(m), -24);
  } else if (e == 0x1F) {
    x = m ? NAN : INFINITY;
  } else {
    x = std::ldexp(1.0f + m / 1024.0f, static_cast<int>(e) - 15);
  }
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof x);
  bits |= sign;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// A view of float32 or float16 group scales (or offsets); vec(i) = 16 of them as floats.
struct Scales {
  const void* data = nullptr;
  bool half = false;

  Scales shifted(int64_t n) const {
    return {static_cast<const char*>(data) + n * (half ? 2 : 4), half};
  }
  vfloat vec(int64_t i) const {
    if (!half) return load_vec(static_cast<const float*>(data) + i);
    const uint16_t* h = static_cast<const uint16_t*>(data) + i;
#if defined(__AVX512F__)
    return reinterpret_cast<vfloat>(
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h))));
#else
    float f[kLanes];
    for (int j = 0; j < kLanes; ++j) f[j] = half_to_float(h[j]);
    return load_vec(f);
#endif
  }
};

// Calls row(k, b) for every input row k of one panel in order, b[kVecs] its 64 weights
// dequantized (scale, and offset when kOffset, of the row's group).
template <Codes kCodes, bool kOffset, typename F>
inline void for_each_row(const uint8_t* codes, Scales scale, Scales offset, int64_t K,
                         int64_t group_rows, F row) {
  for (int64_t g = 0; g * group_rows < K; ++g) {
    vfloat s[kVecs], o[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      s[v] = scale.vec(g * kPanel + v * kLanes);
      o[v] = kOffset ? offset.vec(g * kPanel + v * kLanes) : vfloat{};
    }
    const int64_t k_end = std::min(K, (g + 1) * group_rows);
    vfloat b[kVecs];
    if (kCodes == Codes::kU4) {
      vfloat hi[kVecs];
      for (int64_t k = g * group_rows; k < k_end; k += 2) {  // byte row k / 2: rows k, k + 1
        const uint8_t* bytes = codes + (k / 2) * kPanel;
        for (int v = 0; v < kVecs; ++v) {
          const vu8 pair = load_codes<vu8>(bytes + v * kLanes);
          b[v] = to_float<vu8>(pair & 0xF) * s[v] + o[v];
          hi[v] = to_float<vu8>(pair >> 4) * s[v] + o[v];
        }
        row(k, b);
        row(k + 1, hi);
      }
    } else {
      for (int64_t k = g * group_rows; k < k_end; ++k) {
        const uint8_t* bytes = codes + k * kPanel;
        for (int v = 0; v < kVecs; ++v)
          b[v] = (kCodes == Codes::kF8 ? fp8_to_float(load_codes<vu8>(bytes + v * kLanes))
                                       : load_s8_as_float(bytes + v * kLanes)) * s[v] + o[v];
        row(k, b);
      }
    }
  }
}

// Few rows (one register tile): dequantize in registers and accumulate at once, no scratch.
template <int R, Codes kCodes, bool kOffset>
void direct_tile(const float* x, int64_t K, const uint8_t* codes, Scales scale, Scales offset,
                 int64_t group_rows, float* out, int64_t ldo, int64_t cols) {
  vfloat acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = vfloat{};
  for_each_row<kCodes, kOffset>(codes, scale, offset, K, group_rows,
                                [&](int64_t k, const vfloat* b) {
    for (int r = 0; r < R; ++r) {
      const float a = x[r * K + k];
      for (int v = 0; v < kVecs; ++v) acc[r][v] += a * b[v];
    }
  });
  for (int r = 0; r < R; ++r) {
    float row[kPanel];
    std::memcpy(row, acc[r], sizeof row);
    std::memcpy(out + r * ldo, row, sizeof(float) * cols);
  }
}

// One panel's output columns for all M rows: in registers for up to one tile of rows, else
// through a float scratch panel (dequantized once, then read by every row tile from L2).
template <Codes kCodes, bool kOffset>
void panel_product(const float* x, int64_t M, int64_t K, const uint8_t* codes, Scales scale,
                   Scales offset, int64_t group_rows, float* out, int64_t N, int64_t cols) {
  switch (M) {
#define JAXSERVE_DIRECT(R) \
    case R: return direct_tile<R, kCodes, kOffset>(x, K, codes, scale, offset, group_rows, \
                                                     out, N, cols);
    JAXSERVE_DIRECT(1) JAXSERVE_DIRECT(2) JAXSERVE_DIRECT(3) JAXSERVE_DIRECT(4)
    JAXSERVE_DIRECT(5) JAXSERVE_DIRECT(6)
#undef JAXSERVE_DIRECT
    default: break;
  }
  // one scratch panel per thread, reused across calls (K x 64 floats: 144 KiB at K = 576)
  thread_local std::vector<float> scratch;
  scratch.resize(K * kPanel);
  float* panel = scratch.data();
  for_each_row<kCodes, kOffset>(codes, scale, offset, K, group_rows,
                                [&](int64_t k, const vfloat* b) {
    for (int v = 0; v < kVecs; ++v) store_vec(panel + k * kPanel + v * kLanes, b[v]);
  });
  panel_rows(x, M, K, panel, out, N, cols);
}

template <Codes kCodes>
ffi::Error QuantizedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::AnyBuffer codes, ffi::AnyBuffer scale,
                               ffi::AnyBuffer offset, ffi::Buffer<ffi::S32> layer,
                               ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out,
                               int64_t n_out, int64_t group_rows, int64_t has_offset) {
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scale.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || cd.size() != 4 || sd.size() != 4 || od.size() != 2)
    return ffi::Error::InvalidArgument("quantized_matmul: x, out rank 2; codes, scale rank 4");
  const int64_t K = xd[1], L = cd[0], NP = cd[1], G = sd[2], N = n_out;
  constexpr bool kFour = kCodes == Codes::kU4;
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
  auto is_float = [](ffi::DataType t) { return t == ffi::F32 || t == ffi::F16; };
  if (!is_float(scale.element_type()) || (has_offset && !is_float(offset.element_type())))
    return ffi::Error::InvalidArgument("quantized_matmul: scales must be float32 or float16");
  const Scales sl = Scales{scale.untyped_data(), scale.element_type() == ffi::F16}.shifted(
      l * NP * G * kPanel);
  const Scales ol = has_offset ? Scales{offset.untyped_data(),
                                        offset.element_type() == ffi::F16}.shifted(
                                     l * NP * G * kPanel)
                               : Scales{};
  const float* xp = x.typed_data();
  float* o = out->typed_data();
  std::memset(o + M * N, 0, sizeof(float) * (xd[0] - M) * N);
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t workers = std::max<int64_t>(pool.num_threads(), 1) - 1;
  parallel_for(pool, workers, NP, [=](int64_t p) {
    const uint8_t* cp = cl + p * KC * kPanel;
    const Scales sp = sl.shifted(p * G * kPanel);
    const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
    if (ol.data != nullptr)
      panel_product<kCodes, true>(xp, M, K, cp, sp, ol.shifted(p * G * kPanel), group_rows,
                                  o + n0, N, cols);
    else
      panel_product<kCodes, false>(xp, M, K, cp, sp, Scales{}, group_rows, o + n0, N, cols);
  });
  return ffi::Error::Success();
}

}  // namespace

#define JAXSERVE_QUANTIZED_MATMUL(name, codes)                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, QuantizedMatmulImpl<codes>,                \
                                ffi::Ffi::Bind()                                 \
                                    .Ctx<ffi::ThreadPool>()                      \
                                    .Arg<ffi::Buffer<ffi::F32>>()                \
                                    .Arg<ffi::AnyBuffer>()                       \
                                    .Arg<ffi::AnyBuffer>()                       \
                                    .Arg<ffi::AnyBuffer>()                       \
                                    .Arg<ffi::Buffer<ffi::S32>>()                \
                                    .Arg<ffi::Buffer<ffi::S32>>()                \
                                    .Ret<ffi::Buffer<ffi::F32>>()                \
                                    .Attr<int64_t>("n_out")                      \
                                    .Attr<int64_t>("group_rows")                 \
                                    .Attr<int64_t>("has_offset"));

JAXSERVE_QUANTIZED_MATMUL(JaxserveQuantizedMatmulS8, Codes::kS8)
JAXSERVE_QUANTIZED_MATMUL(JaxserveQuantizedMatmulU4, Codes::kU4)
JAXSERVE_QUANTIZED_MATMUL(JaxserveQuantizedMatmulF8, Codes::kF8)
