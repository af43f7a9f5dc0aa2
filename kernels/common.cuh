// Shared helpers of the distconv CUDA kernels.
//
// Every .cu file in this folder includes this header with `#include "common.cuh"`.
// distconv/ops/cuda.py pastes the header text in place of that line before it hands
// the source to NVRTC (cupy.RawModule), so CuPy's on-disk cache key covers the header
// too; nvcc (tests/test_kernels.py) finds it with -I.
//
// Conventions of all kernels:
//  * 64-bit index math everywhere (i64): tensors may have more than 2^31 elements.
//  * Grid-stride loops: any grid size is correct; the host caps the grid.
//  * Reductions use blocks of DC_RED_THREADS threads (a multiple of 32) and
//    write per-block partial sums; there are no atomics, so results are
//    deterministic for a given launch configuration.
//  * No standard headers: the code must compile under NVRTC as it is.
#ifndef DISTCONV_KERNELS_COMMON_CUH
#define DISTCONV_KERNELS_COMMON_CUH

typedef long long i64;

// Threads per block of the reduction kernels (bn_*_partial); the host launches
// exactly this many.
#define DC_RED_THREADS 256

// for (i64 i = global thread id; i < n; i += total threads)
#define DC_GRID_STRIDE(i, n)                                                     \
    for (i64 i = (i64)blockIdx.x * (i64)blockDim.x + (i64)threadIdx.x,           \
             i##_step = (i64)blockDim.x * (i64)gridDim.x;                        \
         i < (n); i += i##_step)

template <typename T> struct DcNum;

template <> struct DcNum<float> {
    static __device__ __forceinline__ float neg_inf() { return __int_as_float((int)0xff800000u); }
};

template <> struct DcNum<double> {
    static __device__ __forceinline__ double neg_inf() {
        return __longlong_as_double((long long)0xfff0000000000000ull);
    }
};

// Sum over the 32 lanes of a warp; the total is valid in lane 0.
__device__ __forceinline__ double dc_warp_sum(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

// Sum of v over the whole block (blockDim.x a multiple of 32, at most 1024);
// the total is valid in thread 0. `smem` holds at least 32 doubles. Every thread
// of the block must call it (it synchronises); it may be called repeatedly with
// the same `smem`.
__device__ __forceinline__ double dc_block_sum(double v, double* smem) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = dc_warp_sum(v);
    __syncthreads();  // smem may still be read by a previous call
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    const int nwarps = (int)((blockDim.x + 31) >> 5);
    v = (threadIdx.x < (unsigned)nwarps) ? smem[threadIdx.x] : 0.0;
    if (warp == 0) v = dc_warp_sum(v);
    return v;
}

#endif  // DISTCONV_KERNELS_COMMON_CUH
