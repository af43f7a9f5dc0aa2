// Batch-norm pieces on NCHW tensors viewed as (N, C, L), L = H*W; the GPU side of
// distconv.ops.batchnorm (SyncBN split: local sums -> allreduce -> apply).
//
// Reductions (float64 accumulation, atomic-free, deterministic):
//   bn_stats_partial:           part_s[c*P + b]  = sum x,     part_ss[...] = sum x*x
//   bn_backward_reduce_partial: part_dy[c*P + b] = sum dy,    part_dyxmu[...] = sum dy*(x - mean[c])
// over the b-th of P equal chunks of channel c's N*L elements (element
// e = n*L + l). One block of DC_RED_THREADS threads per (c, b); the host adds
// the P partials of each channel.
//
// Element-wise, in the dtype T of the data (per-channel vectors given in T):
//   bn_forward_apply:  y  = (x - mean[c]) * scale[c] + bias[c]
//   bn_backward_apply: dx = ((x - mean[c]) * negk[c] + dy - mdy[c]) * scale[c]
// with the host computing scale = invstd*weight, negk = -sum_dy_xmu*invstd^2/count,
// mdy = sum_dy/count in float64 and casting them to T, like the CPU ops.
//
// Twins: distconv.ops.cuda.bn_*_numpy.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void bn_stats_partial_impl(const T* __restrict__ x,
                                                      double* __restrict__ part_s,
                                                      double* __restrict__ part_ss, i64 N, i64 C,
                                                      i64 L, i64 P) {
    __shared__ double smem[32];
    const i64 M = N * L;
    const i64 chunk = (M + P - 1) / P;
    for (i64 b = blockIdx.x; b < C * P; b += gridDim.x) {  // uniform over the block
        const i64 c = b / P;
        const i64 e0 = (b % P) * chunk;
        const i64 e1 = (e0 + chunk < M) ? e0 + chunk : M;
        double s = 0.0, ss = 0.0;
        for (i64 e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
            const i64 n = e / L;
            const i64 l = e - n * L;
            const double v = (double)x[(n * C + c) * L + l];
            s += v;
            ss += v * v;
        }
        s = dc_block_sum(s, smem);
        ss = dc_block_sum(ss, smem);
        if (threadIdx.x == 0) {
            part_s[b] = s;
            part_ss[b] = ss;
        }
    }
}

template <typename T>
__device__ __forceinline__ void bn_backward_reduce_partial_impl(
    const T* __restrict__ dy, const T* __restrict__ x, const double* __restrict__ mean,
    double* __restrict__ part_dy, double* __restrict__ part_dyxmu, i64 N, i64 C, i64 L, i64 P) {
    __shared__ double smem[32];
    const i64 M = N * L;
    const i64 chunk = (M + P - 1) / P;
    for (i64 b = blockIdx.x; b < C * P; b += gridDim.x) {
        const i64 c = b / P;
        const i64 e0 = (b % P) * chunk;
        const i64 e1 = (e0 + chunk < M) ? e0 + chunk : M;
        const double m = mean[c];
        double sdy = 0.0, sdyx = 0.0;
        for (i64 e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
            const i64 n = e / L;
            const i64 l = e - n * L;
            const i64 o = (n * C + c) * L + l;
            const double d = (double)dy[o];
            sdy += d;
            sdyx += d * ((double)x[o] - m);
        }
        sdy = dc_block_sum(sdy, smem);
        sdyx = dc_block_sum(sdyx, smem);
        if (threadIdx.x == 0) {
            part_dy[b] = sdy;
            part_dyxmu[b] = sdyx;
        }
    }
}

template <typename T>
__device__ __forceinline__ void bn_forward_apply_impl(const T* __restrict__ x,
                                                      const T* __restrict__ mean,
                                                      const T* __restrict__ scale,
                                                      const T* __restrict__ bias,
                                                      T* __restrict__ y, i64 N, i64 C, i64 L) {
    const i64 total = N * C * L;
    DC_GRID_STRIDE(idx, total) {
        const i64 c = (idx / L) % C;
        y[idx] = (x[idx] - mean[c]) * scale[c] + bias[c];
    }
}

template <typename T>
__device__ __forceinline__ void bn_backward_apply_impl(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ mean,
    const T* __restrict__ negk, const T* __restrict__ mdy, const T* __restrict__ scale,
    T* __restrict__ dx, i64 N, i64 C, i64 L) {
    const i64 total = N * C * L;
    DC_GRID_STRIDE(idx, total) {
        const i64 c = (idx / L) % C;
        dx[idx] = ((x[idx] - mean[c]) * negk[c] + dy[idx] - mdy[c]) * scale[c];
    }
}

#define DC_INSTANTIATE(T, SUF)                                                               \
    extern "C" __global__ void bn_stats_partial_##SUF(const T* x, double* part_s,            \
                                                      double* part_ss, i64 N, i64 C, i64 L,  \
                                                      i64 P) {                               \
        bn_stats_partial_impl<T>(x, part_s, part_ss, N, C, L, P);                            \
    }                                                                                        \
    extern "C" __global__ void bn_backward_reduce_partial_##SUF(                             \
        const T* dy, const T* x, const double* mean, double* part_dy, double* part_dyxmu,    \
        i64 N, i64 C, i64 L, i64 P) {                                                        \
        bn_backward_reduce_partial_impl<T>(dy, x, mean, part_dy, part_dyxmu, N, C, L, P);    \
    }                                                                                        \
    extern "C" __global__ void bn_forward_apply_##SUF(const T* x, const T* mean,             \
                                                      const T* scale, const T* bias, T* y,   \
                                                      i64 N, i64 C, i64 L) {                 \
        bn_forward_apply_impl<T>(x, mean, scale, bias, y, N, C, L);                          \
    }                                                                                        \
    extern "C" __global__ void bn_backward_apply_##SUF(                                      \
        const T* dy, const T* x, const T* mean, const T* negk, const T* mdy, const T* scale, \
        T* dx, i64 N, i64 C, i64 L) {                                                        \
        bn_backward_apply_impl<T>(dy, x, mean, negk, mdy, scale, dx, N, C, L);               \
    }

DC_INSTANTIATE(float, f32)
DC_INSTANTIATE(double, f64)

#undef DC_INSTANTIATE
