// One layer's linear map out = x @ W[layer] for XLA:CPU, reading the weight in place from its
// [L, ...] stack, as an XLA FFI custom call.
//
// Why native code: in a scan over stacked layers XLA:CPU first copies each layer's weight out of
// the stack (a dynamic slice), then runs the dot on the copy: for SmolLM2 at 32 decode rows that
// was 54 ms of copies next to 62 ms of dots per step. Here the dot reads the layer's weight where
// it lies. The weight is stored in 64-column panels, [L, NP, K, 64] (see packed_matmul.py), so
// one panel is one contiguous stream of K x 64 floats: the hardware prefetchers keep up and each
// weight is read from memory once per call, whatever the number of rows.
//
//   x      [M, K]           f32
//   w      [L, NP, K, 64]   f32; column n of the layer's [K, N] matrix is panel n / 64, lane n % 64
//                           (columns past N in the last panel are zero padding)
//   layer  i32[]
//   rows   i32[]            rows of x that are real (the rest is bucket padding): only those
//                           are computed, the rest of out is zero, so a step padded from 131
//                           to 192 token rows pays for 131 in its matmuls
//   -> out [M, N]           f32; attr n_out = N (NP = ceil(N / 64))
//
// Work: the NP panels are shared among the caller and XLA's intra-op threads; in a panel, rows go
// in register tiles of 6 x 64 (24 accumulators of 16 floats: fits the 32 AVX-512 registers).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxserve_native::parallel_for;

namespace {

constexpr int64_t kPanel = 64;  // columns per panel
constexpr int kLanes = 16;      // floats per vector
constexpr int kVecs = kPanel / kLanes;
constexpr int kRows = 6;        // rows per register tile

typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

inline vfloat load_vec(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// acc[R, 64] = x[R rows, K] @ panel[K, 64]; written to out (row stride ldo) for `cols` columns.
// The first row tile of a panel streams it from memory: prefetch this many panel rows (8 KB)
// ahead (measured 63 -> 48 ms for a 30-layer 32-row probe; 8..128 rows all within noise).
constexpr int64_t kPrefetchRows = 32;

template <int R, bool kPrefetch = false>
void tile(const float* x, int64_t K, const float* panel, float* out, int64_t ldo, int64_t cols) {
  vfloat acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = vfloat{};
  const float* wk = panel;
  for (int64_t k = 0; k < K; ++k, wk += kPanel) {
    vfloat b[kVecs];
    if (kPrefetch)
      for (int v = 0; v < kVecs; ++v) __builtin_prefetch(wk + kPrefetchRows * kPanel + v * kLanes);
    for (int v = 0; v < kVecs; ++v) b[v] = load_vec(wk + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float a = x[r * K + k];
      for (int v = 0; v < kVecs; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    if (cols == kPanel) {
      std::memcpy(out + r * ldo, acc[r], sizeof acc[r]);
    } else {  // the last panel of a matrix whose width is not a multiple of 64
      float row[kPanel];
      std::memcpy(row, acc[r], sizeof row);
      std::memcpy(out + r * ldo, row, sizeof(float) * cols);
    }
  }
}

void panel_rows(const float* x, int64_t M, int64_t K, const float* panel, float* out, int64_t N,
                int64_t cols) {
  int64_t m = 0;
  if (M >= kRows) { tile<kRows, true>(x, K, panel, out, N, cols); m = kRows; }
  for (; m + kRows <= M; m += kRows) tile<kRows>(x + m * K, K, panel, out + m * N, N, cols);
  const float* xm = x + m * K;
  float* om = out + m * N;
  switch (M - m) {
    case 5: tile<5>(xm, K, panel, om, N, cols); break;
    case 4: tile<4>(xm, K, panel, om, N, cols); break;
    case 3: tile<3>(xm, K, panel, om, N, cols); break;
    case 2: tile<2>(xm, K, panel, om, N, cols); break;
    case 1: tile<1>(xm, K, panel, om, N, cols); break;
    default: break;
  }
}

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> layer,
                            ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out,
                            int64_t n_out) {
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || od.size() != 2)
    return ffi::Error::InvalidArgument("packed_matmul: x must be rank 2, w rank 4, out rank 2");
  const int64_t K = xd[1], L = wd[0], NP = wd[1], N = n_out;
  const int64_t l = layer.typed_data()[0];
  // out rows at and past M are padding: zeroed, never computed
  const int64_t M = std::clamp<int64_t>(rows.typed_data()[0], 0, xd[0]);
  if (wd[2] != K || wd[3] != kPanel || NP != (N + kPanel - 1) / kPanel || od[0] != xd[0] ||
      od[1] != N)
    return ffi::Error::InvalidArgument("packed_matmul: shapes disagree");
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("packed_matmul: layer out of range");
  const float* wl = w.typed_data() + l * NP * K * kPanel;
  const float* xp = x.typed_data();
  float* o = out->typed_data();
  const int64_t workers = std::max<int64_t>(pool.num_threads(), 1) - 1;
  std::memset(o + M * N, 0, sizeof(float) * (xd[0] - M) * N);
  if (M == 0 || N == 0) return ffi::Error::Success();
  parallel_for(pool, workers, NP, [=](int64_t p) {
    const int64_t n0 = p * kPanel;
    panel_rows(xp, M, K, wl + p * K * kPanel, o + n0, N, std::min(kPanel, N - n0));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n_out"));
