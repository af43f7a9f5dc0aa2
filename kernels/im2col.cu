// im2col / col2im for NCHW tensors (kernel, stride, padding, dilation).
//
// Column matrix: element (n, k, l) with k = (c*kh + i)*kw + j (rows ordered
// (c, i, j), like torch.nn.functional.unfold) and l = ho*Wo + wo lives at
// cols[n*col_sn + k*col_sk + l]. col_sn = K*L, col_sk = L is the (N, K, L)
// layout; col_sn = L, col_sk = N*L the (K, N*L) layout that feeds one GEMM
// with all samples.
//
//   im2col: cols(n, k, l) = x[n, c, ho*sh - ph + i*dh, wo*sw - pw + j*dw], 0 outside.
//   col2im: the adjoint. One thread per INPUT pixel gathers every (i, j, ho, wo)
//           with ho*sh - ph + i*dh == h and wo*sw - pw + j*dw == w, adding them
//           in (i, j) order: no atomics, deterministic.
//
// Twins: distconv.ops.cuda.im2col_numpy / col2im_numpy.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void im2col_impl(
    const T* __restrict__ x, T* __restrict__ cols, i64 N, i64 C, i64 H, i64 W, i64 kh, i64 kw,
    i64 sh, i64 sw, i64 ph, i64 pw, i64 dh, i64 dw, i64 Ho, i64 Wo, i64 col_sn, i64 col_sk) {
    const i64 total = N * C * kh * kw * Ho * Wo;
    DC_GRID_STRIDE(idx, total) {
        // idx enumerates (n, c, i, j, ho, wo) row-major
        i64 t = idx;
        const i64 wo = t % Wo;
        t /= Wo;
        const i64 ho = t % Ho;
        t /= Ho;
        const i64 j = t % kw;
        t /= kw;
        const i64 i = t % kh;
        t /= kh;
        const i64 c = t % C;
        const i64 n = t / C;
        const i64 h = ho * sh - ph + i * dh;
        const i64 w = wo * sw - pw + j * dw;
        T v = T(0);
        if (h >= 0 && h < H && w >= 0 && w < W) v = x[((n * C + c) * H + h) * W + w];
        const i64 k = (c * kh + i) * kw + j;
        cols[n * col_sn + k * col_sk + ho * Wo + wo] = v;
    }
}

template <typename T>
__device__ __forceinline__ void col2im_impl(
    const T* __restrict__ cols, T* __restrict__ x, i64 N, i64 C, i64 H, i64 W, i64 kh, i64 kw,
    i64 sh, i64 sw, i64 ph, i64 pw, i64 dh, i64 dw, i64 Ho, i64 Wo, i64 col_sn, i64 col_sk) {
    const i64 total = N * C * H * W;
    DC_GRID_STRIDE(idx, total) {
        i64 t = idx;
        const i64 w = t % W;
        t /= W;
        const i64 h = t % H;
        t /= H;
        const i64 c = t % C;
        const i64 n = t / C;
        const T* base = cols + n * col_sn + (c * kh * kw) * col_sk;
        T acc = T(0);
        for (i64 i = 0; i < kh; ++i) {
            const i64 th = h + ph - i * dh;  // == ho*sh for a contributing output row
            if (th < 0) break;               // th only decreases with i
            if (th % sh != 0) continue;
            const i64 ho = th / sh;
            if (ho >= Ho) continue;
            for (i64 j = 0; j < kw; ++j) {
                const i64 tw = w + pw - j * dw;
                if (tw < 0) break;
                if (tw % sw != 0) continue;
                const i64 wo = tw / sw;
                if (wo >= Wo) continue;
                acc += base[(i * kw + j) * col_sk + ho * Wo + wo];
            }
        }
        x[idx] = acc;
    }
}

#define DC_IM2COL_ARGS                                                                  \
    i64 N, i64 C, i64 H, i64 W, i64 kh, i64 kw, i64 sh, i64 sw, i64 ph, i64 pw, i64 dh,   \
        i64 dw, i64 Ho, i64 Wo, i64 col_sn, i64 col_sk
#define DC_IM2COL_PASS N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, col_sn, col_sk

#define DC_INSTANTIATE(T, SUF)                                                           \
    extern "C" __global__ void im2col_##SUF(const T* x, T* cols, DC_IM2COL_ARGS) {      \
        im2col_impl<T>(x, cols, DC_IM2COL_PASS);                                         \
    }                                                                                    \
    extern "C" __global__ void col2im_##SUF(const T* cols, T* x, DC_IM2COL_ARGS) {      \
        col2im_impl<T>(cols, x, DC_IM2COL_PASS);                                         \
    }

DC_INSTANTIATE(float, f32)
DC_INSTANTIATE(double, f64)

#undef DC_INSTANTIATE
