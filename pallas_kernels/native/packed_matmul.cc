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

#include "panel_tile.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxserve_native::kPanel;
using jaxserve_native::panel_rows;
using jaxserve_native::parallel_for;

namespace {

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
