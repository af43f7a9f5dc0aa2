// ReLU forward / backward on flat arrays of n elements; the GPU side of
// distconv.ops.activation.
//
//   relu_forward:  y  = x if (x > 0 or x is NaN) else 0     (NaN propagates, like torch)
//   relu_backward: dx = dy * (y <= 0 ? 0 : 1)                (gradient 0 at 0; NaN y passes dy)
//
// The output may alias an input (in-place ReLU), so no __restrict__ here.
// Twins: distconv.ops.cuda.relu_forward_numpy / relu_backward_numpy.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void relu_fwd_impl(const T* x, T* y, i64 n) {
    DC_GRID_STRIDE(idx, n) {
        const T v = x[idx];
        y[idx] = (v > T(0) || v != v) ? v : T(0);
    }
}

template <typename T>
__device__ __forceinline__ void relu_bwd_impl(const T* dy, const T* y, T* dx, i64 n) {
    DC_GRID_STRIDE(idx, n) {
        const T m = (y[idx] <= T(0)) ? T(0) : T(1);
        dx[idx] = dy[idx] * m;
    }
}

#define DC_INSTANTIATE(T, SUF)                                                              \
    extern "C" __global__ void relu_forward_##SUF(const T* x, T* y, i64 n) {                \
        relu_fwd_impl<T>(x, y, n);                                                          \
    }                                                                                       \
    extern "C" __global__ void relu_backward_##SUF(const T* dy, const T* y, T* dx, i64 n) { \
        relu_bwd_impl<T>(dy, y, dx, n);                                                     \
    }

DC_INSTANTIATE(float, f32)
DC_INSTANTIATE(double, f64)

#undef DC_INSTANTIATE
