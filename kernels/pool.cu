// 2-D max and average pooling on NCHW tensors, forward and backward; the GPU side of
// distconv.ops.pool.
//
// Window (ho, wo) reads rows h = ho*sh - ph + i, columns w = wo*sw - pw + j,
// i < kh, j < kw. Ho and Wo come from the caller (ceil_mode=True gives windows that
// reach past the right/bottom padding; every read is bounds-checked on all sides).
//
//   max forward:  out-of-bounds reads as -inf; best starts at -inf with the offset
//                 of the window's first in-bounds element (PyTorch's initial index)
//                 and moves to offset k = i*kw + j when v > best or v is NaN
//                 (first maximum wins, NaN propagates); argmax = that k (uint8 when
//                 kh*kw <= 256, else int32, as the CPU op).
//   max backward: dx[h, w] = sum of dy[ho, wo] over the windows whose argmax is
//                 this pixel; one thread per input pixel gathers them in (i, j) order.
//   avg forward:  y = (sum of the in-bounds x of the window) / div, PyTorch's divisor:
//                 hs = ho*sh - ph, he = min(hs + kh, H + ph); cip (count_include_pad)
//                 != 0: div = (he - hs) * (we - ws), else the in-bounds count
//                 (min(he, H) - max(hs, 0)) * (min(we, W) - max(ws, 0)).
//   avg backward: dx[h, w] = sum over the windows containing it of dy / div, gathered
//                 in (i, j) order.
//
// No atomics. Twins: distconv.ops.cuda.*_pool2d_*_numpy.
#include "common.cuh"

#define DC_POOL_ARGS                                                                    \
    i64 N, i64 C, i64 H, i64 W, i64 kh, i64 kw, i64 sh, i64 sw, i64 ph, i64 pw, i64 Ho,   \
        i64 Wo
#define DC_POOL_PASS N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo

template <typename T, typename A>
__device__ __forceinline__ void max_pool_fwd_impl(const T* __restrict__ x, T* __restrict__ y,
                                                  A* __restrict__ arg, DC_POOL_ARGS) {
    const i64 total = N * C * Ho * Wo;
    DC_GRID_STRIDE(idx, total) {
        i64 t = idx;
        const i64 wo = t % Wo;
        t /= Wo;
        const i64 ho = t % Ho;
        const i64 nc = t / Ho;
        const T* xp = x + nc * H * W;
        const i64 h0 = ho * sh - ph;
        const i64 w0 = wo * sw - pw;
        T best = DcNum<T>::neg_inf();
        i64 barg = (h0 < 0 ? -h0 : 0) * kw + (w0 < 0 ? -w0 : 0);
        for (i64 i = 0; i < kh; ++i) {
            const i64 h = h0 + i;
            const bool hin = (h >= 0 && h < H);
            for (i64 j = 0; j < kw; ++j) {
                const i64 w = w0 + j;
                const T v = (hin && w >= 0 && w < W) ? xp[h * W + w] : DcNum<T>::neg_inf();
                const i64 k = i * kw + j;
                if (v > best || v != v) {
                    best = v;
                    barg = k;
                }
            }
        }
        y[idx] = best;
        arg[idx] = (A)barg;
    }
}

template <typename T, typename A>
__device__ __forceinline__ void max_pool_bwd_impl(const T* __restrict__ dy,
                                                  const A* __restrict__ arg, T* __restrict__ dx,
                                                  DC_POOL_ARGS) {
    const i64 total = N * C * H * W;
    DC_GRID_STRIDE(idx, total) {
        i64 t = idx;
        const i64 w = t % W;
        t /= W;
        const i64 h = t % H;
        const i64 nc = t / H;
        const T* dyp = dy + nc * Ho * Wo;
        const A* ap = arg + nc * Ho * Wo;
        T acc = T(0);
        for (i64 i = 0; i < kh; ++i) {
            const i64 th = h + ph - i;  // == ho*sh for a window containing row h at offset i
            if (th < 0) break;
            if (th % sh != 0) continue;
            const i64 ho = th / sh;
            if (ho >= Ho) continue;
            for (i64 j = 0; j < kw; ++j) {
                const i64 tw = w + pw - j;
                if (tw < 0) break;
                if (tw % sw != 0) continue;
                const i64 wo = tw / sw;
                if (wo >= Wo) continue;
                const i64 o = ho * Wo + wo;
                if ((i64)ap[o] == i * kw + j) acc += dyp[o];
            }
        }
        dx[idx] = acc;
    }
}

// PyTorch's average-pooling divisor of window (ho, wo); see the header comment.
__device__ __forceinline__ i64 avg_pool_divisor(i64 ho, i64 wo, i64 H, i64 W, i64 kh, i64 kw,
                                                i64 sh, i64 sw, i64 ph, i64 pw, i64 cip) {
    const i64 hs = ho * sh - ph;
    const i64 ws = wo * sw - pw;
    i64 he = hs + kh;
    if (he > H + ph) he = H + ph;
    i64 we = ws + kw;
    if (we > W + pw) we = W + pw;
    if (cip) return (he - hs) * (we - ws);
    const i64 nh = (he < H ? he : H) - (hs > 0 ? hs : 0);
    const i64 nw = (we < W ? we : W) - (ws > 0 ? ws : 0);
    return nh * nw;
}

template <typename T>
__device__ __forceinline__ void avg_pool_fwd_impl(const T* __restrict__ x, T* __restrict__ y,
                                                  DC_POOL_ARGS, i64 cip) {
    const i64 total = N * C * Ho * Wo;
    DC_GRID_STRIDE(idx, total) {
        i64 t = idx;
        const i64 wo = t % Wo;
        t /= Wo;
        const i64 ho = t % Ho;
        const i64 nc = t / Ho;
        const T* xp = x + nc * H * W;
        const i64 h0 = ho * sh - ph;
        const i64 w0 = wo * sw - pw;
        T acc = T(0);
        for (i64 i = 0; i < kh; ++i) {
            const i64 h = h0 + i;
            if (h < 0 || h >= H) continue;
            for (i64 j = 0; j < kw; ++j) {
                const i64 w = w0 + j;
                if (w < 0 || w >= W) continue;
                acc += xp[h * W + w];
            }
        }
        y[idx] = acc / (T)avg_pool_divisor(ho, wo, H, W, kh, kw, sh, sw, ph, pw, cip);
    }
}

template <typename T>
__device__ __forceinline__ void avg_pool_bwd_impl(const T* __restrict__ dy, T* __restrict__ dx,
                                                  DC_POOL_ARGS, i64 cip) {
    const i64 total = N * C * H * W;
    DC_GRID_STRIDE(idx, total) {
        i64 t = idx;
        const i64 w = t % W;
        t /= W;
        const i64 h = t % H;
        const i64 nc = t / H;
        const T* dyp = dy + nc * Ho * Wo;
        T acc = T(0);
        for (i64 i = 0; i < kh; ++i) {
            const i64 th = h + ph - i;
            if (th < 0) break;
            if (th % sh != 0) continue;
            const i64 ho = th / sh;
            if (ho >= Ho) continue;
            for (i64 j = 0; j < kw; ++j) {
                const i64 tw = w + pw - j;
                if (tw < 0) break;
                if (tw % sw != 0) continue;
                const i64 wo = tw / sw;
                if (wo >= Wo) continue;
                acc += dyp[ho * Wo + wo] /
                       (T)avg_pool_divisor(ho, wo, H, W, kh, kw, sh, sw, ph, pw, cip);
            }
        }
        dx[idx] = acc;
    }
}

#define DC_INSTANTIATE_MAX(T, A, SUF)                                                        \
    extern "C" __global__ void max_pool2d_forward_##SUF(const T* x, T* y, A* arg,            \
                                                        DC_POOL_ARGS) {                      \
        max_pool_fwd_impl<T, A>(x, y, arg, DC_POOL_PASS);                                    \
    }                                                                                        \
    extern "C" __global__ void max_pool2d_backward_##SUF(const T* dy, const A* arg, T* dx,   \
                                                         DC_POOL_ARGS) {                     \
        max_pool_bwd_impl<T, A>(dy, arg, dx, DC_POOL_PASS);                                  \
    }

#define DC_INSTANTIATE_AVG(T, SUF)                                                           \
    extern "C" __global__ void avg_pool2d_forward_##SUF(const T* x, T* y, DC_POOL_ARGS,      \
                                                        i64 cip) {                           \
        avg_pool_fwd_impl<T>(x, y, DC_POOL_PASS, cip);                                       \
    }                                                                                        \
    extern "C" __global__ void avg_pool2d_backward_##SUF(const T* dy, T* dx, DC_POOL_ARGS,   \
                                                         i64 cip) {                          \
        avg_pool_bwd_impl<T>(dy, dx, DC_POOL_PASS, cip);                                     \
    }

DC_INSTANTIATE_MAX(float, unsigned char, f32_u8)
DC_INSTANTIATE_MAX(float, int, f32_i32)
DC_INSTANTIATE_MAX(double, unsigned char, f64_u8)
DC_INSTANTIATE_MAX(double, int, f64_i32)
DC_INSTANTIATE_AVG(float, f32)
DC_INSTANTIATE_AVG(double, f64)

#undef DC_INSTANTIATE_MAX
#undef DC_INSTANTIATE_AVG
