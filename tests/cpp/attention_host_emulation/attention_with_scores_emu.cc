// Test harness, not part of any build: runs the REAL device code of
// csrc/attention_with_scores/attention_with_scores_kernels.cuh on the CPU. Each CTA is 256
// std::threads with real barriers (__syncthreads, __syncthreads_or, __syncwarp) and warp
// shuffles through shared slots; mma.sync takes the kernels' pre-sm_80 fragment emulation
// (__CUDA_ARCH__ is not defined here). Launch sequence and plan as attention_with_scores_launch.cu.
// Used by tests/test_attention_cuda_host.py
// (g++ -std=c++20 -pthread -I<cuda>/include -Icsrc/attention_with_scores).
//
// usage: attn_emu dtype B H Hkv Nq Nk Dh Dv causal has_bias scale R smem_optin pad dir
//   dtype 0 f32 / 1 f16 / 2 bf16 / 3 f64; R = -1: every row scored; pad: extra elements per
//   row of q / k / v (strided rows, no 16-byte loads); dir holds q.bin, k.bin, v.bin,
//   bias.bin, rows.bin (float64) and receives out.bin, scores.bin (float64).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>
#include <vector_functions.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#ifdef __launch_bounds__
#undef __launch_bounds__
#endif
#define __launch_bounds__(...)
#ifndef __shared__
#define __shared__
#endif

namespace emu {
thread_local dim3 tIdx;
dim3 bIdx, gDim;
std::unique_ptr<std::barrier<>> block_bar;
std::unique_ptr<std::barrier<>> warp_bar[8];
std::atomic<int> or_slot[3];
thread_local long long or_calls = 0;
thread_local long long shfl_calls = 0;
unsigned long long shfl_buf[8][2][32];
}  // namespace emu
#define threadIdx emu::tIdx
#define blockIdx emu::bIdx
#define gridDim emu::gDim

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline int __syncthreads_or(int p) {
  const long long n = emu::or_calls++;
  if (threadIdx.x == 0) emu::or_slot[(n + 1) % 3].store(0);
  if (p) emu::or_slot[n % 3].store(1);
  emu::block_bar->arrive_and_wait();
  return emu::or_slot[n % 3].load();
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_bar[threadIdx.x >> 5]->arrive_and_wait(); }
template <typename V> inline V shfl_src(V v, int src) {
  static_assert(sizeof(V) <= 8, "");
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int slot = (int)(emu::shfl_calls++ & 1);
  unsigned long long x = 0;
  std::memcpy(&x, &v, sizeof(V));
  emu::shfl_buf[w][slot][lane] = x;
  emu::warp_bar[w]->arrive_and_wait();
  x = emu::shfl_buf[w][slot][src & 31];
  V r;
  std::memcpy(&r, &x, sizeof(V));
  return r;
}
template <typename V> inline V __shfl_xor_sync(unsigned, V v, int o) { return shfl_src(v, (threadIdx.x & 31) ^ o); }
template <typename V> inline V __shfl_sync(unsigned, V v, int src) { return shfl_src(v, src); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline double __longlong_as_double(long long x) { double f; std::memcpy(&f, &x, 8); return f; }
using std::exp2; using std::log2;

namespace tokenreduce { namespace attn { alignas(16) unsigned char smem_raw[256 * 1024]; } }
#include "attention_with_scores_kernels.cuh"
#include "attention_with_scores_plan.h"

using namespace tokenreduce::attn;

template <typename F> void run_grid(dim3 grid, F&& body) {
  emu::gDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        emu::bIdx = dim3(x, y, z);
        std::memset(smem_raw, 0xff, sizeof(smem_raw));  // NaN garbage: reads of unwritten smem show up
        emu::block_bar = std::make_unique<std::barrier<>>(kThreads);
        for (auto& b : emu::warp_bar) b = std::make_unique<std::barrier<>>(32);
        for (auto& s : emu::or_slot) s.store(0);
        std::vector<std::thread> th;
        for (int t = 0; t < kThreads; ++t)
          th.emplace_back([&, t] {
            emu::tIdx = dim3(t, 0, 0);
            emu::or_calls = 0;
            emu::shfl_calls = 0;
            body();
          });
        for (auto& t : th) t.join();
      }
}

static std::vector<double> read_f64(const char* dir, const char* name, size_t n) {
  std::vector<double> v(n);
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = fopen(path, "rb");
  if (!f || fread(v.data(), 8, n, f) != n) { fprintf(stderr, "read %s\n", path); exit(2); }
  fclose(f);
  return v;
}

template <typename T> T from_d(double x) { return (T)x; }
template <> __half from_d<__half>(double x) { return __float2half_rn((float)x); }
template <> __nv_bfloat16 from_d<__nv_bfloat16>(double x) { return __float2bfloat16_rn((float)x); }
template <typename T> double to_d(T x) { return (double)x; }
template <> double to_d<__half>(__half x) { return __half2float(x); }
template <> double to_d<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// layout: q [B][H][Nq][Dh] stored with row stride Dh + pad (pad > 0: strided rows)
template <typename T>
int run(int dtype, int B, int H, int Hkv, int Nq, int Nk, int Dh, int Dv, double scale, int causal, int has_bias,
        long long R, long long smem, int pad, const char* dir) {
  typedef typename Traits<T>::acc acc;
  auto load = [&](const char* name, int heads, int n, int d) {
    std::vector<double> x = read_f64(dir, name, (size_t)B * heads * n * d);
    std::vector<T> y((size_t)B * heads * n * (d + pad), from_d<T>(12345.0));
    for (size_t r = 0; r < (size_t)B * heads * n; ++r)
      for (int c = 0; c < d; ++c) y[r * (d + pad) + c] = from_d<T>(x[r * d + c]);
    return y;
  };
  std::vector<T> q = load("q.bin", H, Nq, Dh), k = load("k.bin", Hkv, Nk, Dh), v = load("v.bin", Hkv, Nk, Dv);
  long long qs[3] = {(long long)H * Nq * (Dh + pad), (long long)Nq * (Dh + pad), Dh + pad};
  long long ks[3] = {(long long)Hkv * Nk * (Dh + pad), (long long)Nk * (Dh + pad), Dh + pad};
  long long vs[3] = {(long long)Hkv * Nk * (Dv + pad), (long long)Nk * (Dv + pad), Dv + pad};
  std::vector<acc> bias;
  if (has_bias) {
    std::vector<double> b = read_f64(dir, "bias.bin", (size_t)B * Nk);
    bias.assign(b.begin(), b.end());
  }
  std::vector<long long> rows;
  if (R >= 0) {
    std::vector<double> r = read_f64(dir, "rows.bin", (size_t)R);
    for (double x : r) rows.push_back((long long)x);
  }
  Plan plan = make_plan(dtype, H, Nq, Nk, Dh, Dv, R, smem);
  if (!plan.ok) { fprintf(stderr, "plan not ok\n"); return 3; }
  std::vector<T> out((size_t)B * H * Nq * Dv, from_d<T>(777.0));
  std::vector<acc> scores((size_t)B * Nk, acc(-1)), partial((size_t)B * plan.partial_rows * Nk, acc(555));
  std::vector<acc> lse((size_t)B * H * Nq, acc(555)), oacc((size_t)B * H * Nq * Dv, acc(555));
  auto vec_ok = [&](const T* p, const long long* st, int D) {
    const int vw = 16 / (int)sizeof(T);
    if (reinterpret_cast<unsigned long long>(p) % 16 || D % vw) return 0;
    for (int e = 0; e < 3; ++e) if (st[e] % vw) return 0;
    return 1;
  };
  const int vqk = vec_ok(q.data(), qs, Dh) && vec_ok(k.data(), ks, Dh), vv = vec_ok(v.data(), vs, Dv);
  const acc sl2 = (acc)(scale * 1.4426950408889634074);
  const acc* bp = has_bias ? bias.data() : nullptr;
  const long long* rp = R >= 0 ? rows.data() : nullptr;
  const int Rk = rp ? (int)R : 0;
  if (plan.fwd_smem > (long long)sizeof(smem_raw)) return 4;
  run_grid(dim3(plan.nqb, H, B), [&] {
    attn_fwd_kernel<T>(q.data(), k.data(), v.data(), qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
                       bp, rp, Rk, out.data(), plan.need_lse ? lse.data() : nullptr,
                       plan.need_oacc ? oacc.data() : nullptr, plan.scores_in_fwd ? partial.data() : nullptr, H,
                       Hkv, Nq, Nk, Dh, Dv, sl2, causal, plan.kc, vqk, vv);
  });
  if (plan.colscore)
    run_grid(dim3(plan.nkt, H, B), [&] {
      attn_colscore_kernel<T>(q.data(), k.data(), qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], bp, rp, Rk, lse.data(),
                              partial.data(), H, Hkv, Nq, Nk, Dh, sl2, causal, vqk);
    });
  const long long Reff = rp ? R : Nq;
  const acc inv = (acc)(1.0 / ((double)H * (double)Reff));
  run_grid(dim3((Nk + kThreads - 1) / kThreads, B), [&] {
    attn_reduce_scores_kernel<acc>(partial.data(), (int)plan.partial_rows, Nk, inv, scores.data());
  });
  char path[1024];
  snprintf(path, sizeof path, "%s/out.bin", dir);
  FILE* f = fopen(path, "wb");
  for (T x : out) { double d = to_d(x); fwrite(&d, 8, 1, f); }
  fclose(f);
  snprintf(path, sizeof path, "%s/scores.bin", dir);
  f = fopen(path, "wb");
  for (acc x : scores) { double d = x; fwrite(&d, 8, 1, f); }
  fclose(f);
  printf("kc=%d multi=%d in_fwd=%d colscore=%d vqk=%d vv=%d\n", plan.kc, (int)plan.multi_chunk,
         (int)plan.scores_in_fwd, (int)plan.colscore, vqk, vv);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 16) { fprintf(stderr, "usage\n"); return 1; }
  const int dtype = atoi(argv[1]);
  int a[9];
  for (int i = 0; i < 9; ++i) a[i] = atoi(argv[2 + i]);  // B H Hkv Nq Nk Dh Dv causal has_bias
  const double scale = atof(argv[11]);
  const long long R = atoll(argv[12]), smem = atoll(argv[13]);
  const int pad = atoi(argv[14]);
  const char* dir = argv[15];
#define RUN(T) run<T>(dtype, a[0], a[1], a[2], a[3], a[4], a[5], a[6], scale, a[7], a[8], R, smem, pad, dir)
  switch (dtype) {
    case 0: return RUN(float);
    case 1: return RUN(__half);
    case 2: return RUN(__nv_bfloat16);
    case 3: return RUN(double);
  }
  return 1;
}
