// Shared by the native matmuls: x[rows, K] @ one 64-column float panel [K, 64], in register
// tiles of 6 x 64 (24 accumulators of 16 floats: fits the 32 AVX-512 registers).
#pragma once

#include <cstdint>
#include <cstring>

namespace jaxserve_native {

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

inline void panel_rows(const float* x, int64_t M, int64_t K, const float* panel, float* out, int64_t N,
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

}  // namespace jaxserve_native
