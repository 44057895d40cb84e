// Launch geometry shared by the CUDA launchers (csrc/<op>/<op>_launch.cu), their torch glue
// and the NVRTC fallback (tokenreduce/nvrtc, which reads the plans through
// tokenreduce._C.plans). Plain C++: no CUDA, no torch, so the CPU-only build compiles it
// into the Python module too and the two launch paths cannot drift apart.
#pragma once

namespace tokenreduce {
namespace cuda {

// One kernel launch: grid (x, y, z), threads per block, dynamic shared memory in bytes.
// grid_x == 0 means "not launched" (the step is skipped for these shapes).
struct KernelLaunch {
  long long grid_x = 0, grid_y = 1, grid_z = 1;
  int block = 0;
  long long smem = 0;
};

inline long long blocks_for(long long n, long long per) { return (n + per - 1) / per; }

inline KernelLaunch kernel_launch(long long gx, long long gy, long long gz, int block, long long smem = 0) {
  KernelLaunch l;
  l.grid_x = gx;
  l.grid_y = gy;
  l.grid_z = gz;
  l.block = block;
  l.smem = smem;
  return l;
}

// Warp-per-token kernels (squared / inverse norms, nearest neighbours): 256 threads, one
// token per warp, so 8 tokens per block (the kernels' __launch_bounds__(256) and their
// `blockIdx.x * 8 + warp` indexing).
constexpr int kRowThreads = 256;
constexpr int kRowsPerBlock = kRowThreads / 32;
// Tiled pairwise kernels (Gram tiles, matching, assignment): 64 x 64 tiles of 256 threads.
// The launchers static_assert that these equal kTileM / kTileThreads of cuda_common.cuh.
constexpr int kTileRows = 64;
constexpr int kTileBlock = 256;

}  // namespace cuda
}  // namespace tokenreduce
