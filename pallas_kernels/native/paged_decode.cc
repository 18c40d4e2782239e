// Paged decode attention for XLA:CPU, as an XLA FFI custom call.
//
// Why native code: on CPU, XLA runs a decode step's attention as many small passes (page gather,
// transpose, mask, tiny batched dots of G ~ 3 query rows), each over the whole live K/V, at a few
// GB/s. Here each (sequence, kv head) reads its live K/V pages once, in place, straight from the
// cache: the pages of one head are page_size x D contiguous floats, so the loops stream.
//
// Contract (a subset of pallas_kernels/reference.py, see there): sequence slot s < num_seqs with
// exactly one query row (cu_q_lens[s + 1] - cu_q_lens[s] == 1) is a decode row at position
// kv_lens[s] - 1; it attends to positions [max(0, pos - window + 1), pos] of its pages. Every
// other slot's output is zero (the caller computes prefill rows another way). Positions past
// kv_len, pages not in a live slot's table and other layers are never read.
//
//   q            [T, Hq, D]              f32 or bf16
//   k_cache      [L, P, Hkv, page_size, D]  same dtype as q
//   v_cache      [L, P, Hkv, page_size, D]
//   layer        i32[]
//   kv_lens      i32[S]
//   page_indices i32[S, pages_per_seq]
//   cu_q_lens    i32[S + 1]
//   num_seqs     i32[1]
//   -> out       f32[S, Hq, D]   the decode row's output per sequence slot (zero elsewhere)
//   attrs: sm_scale (f32), soft_cap (f32, <= 0: none), sliding_window (i32, <= 0: none)
//
// JaxservePagedDecodeQuantized reads a quantized cache (pallas_kernels/kv_quant.py) instead:
// k/v codes [L, P, Hkv, page_size, D] s8 or f8e4m3fn, each followed by its scales
// f32[L, P, Hkv, page_size] (x = code * the token's scale). The scale is per token, so it
// multiplies the score q . codes_t, and the softmax weight of v_t, not every element.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxserve_native::parallel_for;

namespace {

inline float load(float x) { return x; }
inline float load(uint16_t bf16) {  // bfloat16 is the top half of a float32
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float load(int8_t code) { return static_cast<float>(code); }

// float8 e4m3fn codes, converted through a table of all 256 values
struct Fp8 {
  uint8_t bits;
};
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 0xF, m = b & 0x7;
      float x = e == 0 ? std::ldexp(static_cast<float>(m), -9)
                       : std::ldexp(1.0f + m / 8.0f, e - 7);
      if (e == 0xF && m == 0x7) x = NAN;
      value[b] = (b & 0x80) ? -x : x;
    }
  }
};
const Fp8Table kFp8;
inline float load(Fp8 code) { return kFp8.value[code.bits]; }

// exp for x <= 0 (softmax weights), written so that the compiler vectorizes the loop around it
// (a call to expf is not): range reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-6
// polynomial for e^r (relative error ~2e-7, float32 rounding) and 2^n through the exponent bits.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // below: e^x underflows; the weight is 0 for our purposes
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split: hi + lo
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Problem {
  int64_t num_pages, hkv, page_size, d, g, hq, pages_per_seq, num_tokens;
  int64_t layer;
  const int32_t* kv_lens;
  const int32_t* page_indices;
  const int32_t* cu_q_lens;
  float sm_scale, soft_cap;
  int32_t sliding_window;
  // a quantized cache's per-token scales f32[L, P, Hkv, page_size], else null
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
};

// One (sequence slot, kv head): G query rows against the live context, two passes (scores, then
// softmax-weighted V), scores kept in `scratch` (G x context floats: tens of KB).
template <typename T, typename C>
void attend(const Problem& p, const T* q, const C* k, const C* v, float* out, int64_t s,
            int64_t h, std::vector<float>& scratch) {
  const int64_t row = p.cu_q_lens[s];
  const int64_t kv_len = std::min<int64_t>(p.kv_lens[s], p.pages_per_seq * p.page_size);
  if (p.cu_q_lens[s + 1] - row != 1 || kv_len <= 0 || row < 0 || row >= p.num_tokens) return;
  const int64_t pos = kv_len - 1;
  const int64_t first = p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;
  const int64_t n = kv_len - first;  // keys attended
  const int64_t G = p.g, D = p.d, ps = p.page_size;
  scratch.resize(G * n + 2 * G * D);
  float* scores = scratch.data();       // [G, n]
  float* qv = scores + G * n;           // [G, D] scaled queries
  float* acc = qv + G * D;              // [G, D]
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i)
      qv[g * D + i] = load(q[(row * p.hq + h * G + g) * D + i]) * p.sm_scale;
  const int32_t* table = p.page_indices + s * p.pages_per_seq;
  const int64_t head_stride = ps * D;
  auto page_base = [&](int64_t j) -> int64_t {  // element offset of page j's head h, or -1
    const int64_t page = table[j];
    if (page < 0 || page >= p.num_pages) return -1;
    return ((p.layer * p.num_pages + page) * p.hkv + h) * head_stride;
  };

  // pass 1: scores[g, t] = q_g . k_t
  for (int64_t j = first / ps; j * ps < kv_len; ++j) {
    const int64_t base = page_base(j);
    const int64_t t0 = std::max(first, j * ps), t1 = std::min(kv_len, (j + 1) * ps);
    for (int64_t t = t0; t < t1; ++t) {
      const C* kt = k + base + (t - j * ps) * D;
      // the token's scale: scales are laid out as the codes without their D axis
      const float scale = p.k_scale != nullptr && base >= 0 ? p.k_scale[base / D + t - j * ps]
                                                            : 1.f;
      for (int64_t g = 0; g < G; ++g) {
        float dot = -INFINITY;  // a page outside the pool: no weight (never expected)
        if (base >= 0) {
          dot = 0.f;
          const float* qg = qv + g * D;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < D; ++i) dot += qg[i] * load(kt[i]);
          dot *= scale;
        }
        scores[g * n + (t - first)] = dot;
      }
    }
  }
  // softmax per query row (exact: max first, then exp and sum)
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * n;
    if (p.soft_cap > 0)
      for (int64_t t = 0; t < n; ++t) sg[t] = p.soft_cap * std::tanh(sg[t] / p.soft_cap);
    float m = sg[0];
    for (int64_t t = 1; t < n; ++t) m = std::max(m, sg[t]);
    if (m == -INFINITY) m = 0.f;  // every key invalid: all weights exp(-inf) = 0
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      sg[t] = exp_nonpositive(sg[t] - m);
      sum += sg[t];
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
  }
  // pass 2: acc[g] = sum_t p[g, t] v_t
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t j = first / ps; j * ps < kv_len; ++j) {
    const int64_t base = page_base(j);
    if (base < 0) continue;
    const int64_t t0 = std::max(first, j * ps), t1 = std::min(kv_len, (j + 1) * ps);
    for (int64_t t = t0; t < t1; ++t) {
      const C* vt = v + base + (t - j * ps) * D;
      const float scale = p.v_scale != nullptr ? p.v_scale[base / D + t - j * ps] : 1.f;
      for (int64_t g = 0; g < G; ++g) {
        const float w = scores[g * n + (t - first)] * scale;
        float* ag = acc + g * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) ag[i] += w * load(vt[i]);
      }
    }
  }
  std::memcpy(out + (s * p.hq + h * G) * D, acc, sizeof(float) * G * D);
}

template <typename T, typename C>
void run(const Problem& p, int64_t live, const void* q, const void* k, const void* v, float* out,
         ffi::ThreadPool& pool) {
  const int64_t items = live * p.hkv;
  const int64_t workers = std::max<int64_t>(pool.num_threads(), 1) - 1;
  auto body = [&p, q, k, v, out](int64_t i) {
    thread_local std::vector<float> scratch;
    attend(p, static_cast<const T*>(q), static_cast<const C*>(k), static_cast<const C*>(v), out,
           i / p.hkv, i % p.hkv, scratch);
  };
  if (items > 0) parallel_for(pool, workers, items, body);
}

// The shapes and metadata of either entry point into p (scales left null); an error or none.
ffi::Error describe(Problem& p, ffi::AnyBuffer& q, ffi::AnyBuffer& k_cache,
                    ffi::AnyBuffer& v_cache, ffi::Buffer<ffi::S32>& layer,
                    ffi::Buffer<ffi::S32>& kv_lens, ffi::Buffer<ffi::S32>& page_indices,
                    ffi::Buffer<ffi::S32>& cu_q_lens, float sm_scale, float soft_cap,
                    int32_t sliding_window) {
  auto qd = q.dimensions(), kd = k_cache.dimensions(), pd = page_indices.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || pd.size() != 2)
    return ffi::Error::InvalidArgument("paged_decode: q must be rank 3, caches rank 5, "
                                       "page_indices rank 2");
  if (k_cache.element_type() != v_cache.element_type() ||
      v_cache.dimensions().size() != 5)
    return ffi::Error::InvalidArgument("paged_decode: k and v caches must share one dtype");
  p.num_tokens = qd[0];
  p.hq = qd[1];
  p.d = qd[2];
  p.num_pages = kd[1];
  p.hkv = kd[2];
  p.page_size = kd[3];
  p.g = p.hq / p.hkv;
  p.pages_per_seq = pd[1];
  p.layer = layer.typed_data()[0];
  if (p.layer < 0 || p.layer >= kd[0] || kd[4] != p.d || p.hq % p.hkv)
    return ffi::Error::InvalidArgument("paged_decode: layer out of range or shapes disagree");
  p.kv_lens = kv_lens.typed_data();
  p.page_indices = page_indices.typed_data();
  p.cu_q_lens = cu_q_lens.typed_data();
  p.sm_scale = sm_scale;
  p.soft_cap = soft_cap;
  p.sliding_window = sliding_window;
  return ffi::Error::Success();
}

int64_t zero_output(const Problem& p, ffi::Buffer<ffi::S32>& num_seqs, int64_t slots,
                    float* o) {
  std::memset(o, 0, sizeof(float) * slots * p.hq * p.d);
  return std::clamp<int64_t>(num_seqs.typed_data()[0], 0, slots);  // live slots
}

ffi::Error PagedDecodeImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                           ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> layer,
                           ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
                           ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
                           ffi::ResultBuffer<ffi::F32> out, float sm_scale, float soft_cap,
                           int32_t sliding_window) {
  Problem p;
  ffi::Error err = describe(p, q, k_cache, v_cache, layer, kv_lens, page_indices, cu_q_lens,
                            sm_scale, soft_cap, sliding_window);
  if (err.failure()) return err;
  if (q.element_type() != k_cache.element_type())
    return ffi::Error::InvalidArgument("paged_decode: q and the caches must share one dtype");
  float* o = out->typed_data();
  const int64_t live = zero_output(p, num_seqs, page_indices.dimensions()[0], o);
  const void *qp = q.untyped_data(), *kp = k_cache.untyped_data(), *vp = v_cache.untyped_data();
  switch (q.element_type()) {
    case ffi::F32: run<float, float>(p, live, qp, kp, vp, o, pool); break;
    case ffi::BF16: run<uint16_t, uint16_t>(p, live, qp, kp, vp, o, pool); break;
    default:
      return ffi::Error::InvalidArgument("paged_decode: dtype must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

template <typename T>
void run_codes(const Problem& p, int64_t live, ffi::DataType codes, const void* q,
               const void* k, const void* v, float* o, ffi::ThreadPool& pool) {
  if (codes == ffi::S8) run<T, int8_t>(p, live, q, k, v, o, pool);
  else run<T, Fp8>(p, live, q, k, v, o, pool);
}

ffi::Error PagedDecodeQuantizedImpl(
    ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_codes, ffi::Buffer<ffi::F32> k_scale,
    ffi::AnyBuffer v_codes, ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::S32> layer,
    ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
    ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
    ffi::ResultBuffer<ffi::F32> out, float sm_scale, float soft_cap, int32_t sliding_window) {
  Problem p;
  ffi::Error err = describe(p, q, k_codes, v_codes, layer, kv_lens, page_indices, cu_q_lens,
                            sm_scale, soft_cap, sliding_window);
  if (err.failure()) return err;
  const ffi::DataType codes = k_codes.element_type();
  if (codes != ffi::S8 && codes != ffi::F8E4M3FN)
    return ffi::Error::InvalidArgument("paged_decode: codes must be int8 or float8_e4m3fn");
  const int64_t per_token = k_codes.element_count() / p.d;  // L * P * Hkv * page_size
  if (k_scale.element_count() != per_token || v_scale.element_count() != per_token)
    return ffi::Error::InvalidArgument("paged_decode: one scale per token and KV head");
  p.k_scale = k_scale.typed_data();
  p.v_scale = v_scale.typed_data();
  float* o = out->typed_data();
  const int64_t live = zero_output(p, num_seqs, page_indices.dimensions()[0], o);
  const void *qp = q.untyped_data(), *kp = k_codes.untyped_data(), *vp = v_codes.untyped_data();
  switch (q.element_type()) {
    case ffi::F32: run_codes<float>(p, live, codes, qp, kp, vp, o, pool); break;
    case ffi::BF16: run_codes<uint16_t>(p, live, codes, qp, kp, vp, o, pool); break;
    default:
      return ffi::Error::InvalidArgument("paged_decode: q must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedDecode, PagedDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int32_t>("sliding_window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedDecodeQuantized, PagedDecodeQuantizedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int32_t>("sliding_window"));
