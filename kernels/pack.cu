// Pack / unpack channel blocks of an (N, C, P) tensor (P = H*W, or any trailing size):
// the GPU twins of distconv.comm._pack / _assemble for axis=1.
//
// starts[0..R] are the channel offsets of the R blocks (starts[0] = 0,
// starts[R] = C, non-decreasing; empty blocks allowed). Block r holds
// channels [s, s + cr) with s = starts[r], cr = starts[r+1] - s, and sits in
// the flat buffer at offset N*P*s as a contiguous (N, cr, P) array:
//
//   flat[N*P*s + (n*cr + (ch - s))*P + p] == x[(n*C + ch)*P + p]
//
// Both kernels run one thread per OUTPUT element (coalesced writes; reads are
// contiguous runs of P). The kernels only move bits, so they are instantiated
// per element size (1, 2, 4, 8 bytes) and serve every dtype.
//
// Twins: distconv.ops.cuda.pack_channel_blocks_numpy / unpack_channel_blocks_numpy.
#include "common.cuh"

// The block that holds channel-space coordinate v (0 <= v < starts[R]): the
// largest r in [0, R) with starts[r] <= v, which is never an empty block.
__device__ __forceinline__ i64 dc_find_block(const i64* __restrict__ starts, i64 R, i64 v) {
    i64 lo = 0, hi = R - 1;  // starts[0] == 0 <= v, so the answer is in [lo, hi]
    while (lo < hi) {
        const i64 mid = (lo + hi + 1) >> 1;
        if (starts[mid] <= v)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

template <typename U>
__device__ __forceinline__ void pack_impl(const U* __restrict__ x, U* __restrict__ flat,
                                          const i64* __restrict__ starts, i64 R, i64 N, i64 C,
                                          i64 P) {
    const i64 q = N * P;  // flat elements per channel of the whole tensor
    const i64 total = q * C;
    DC_GRID_STRIDE(idx, total) {
        // block r starts at flat offset q*starts[r], so r is found from idx / q
        const i64 r = dc_find_block(starts, R, idx / q);
        const i64 s = starts[r];
        const i64 cr = starts[r + 1] - s;  // >= 1
        const i64 local = idx - q * s;     // in [0, N*cr*P)
        const i64 p = local % P;
        const i64 t = local / P;
        const i64 cl = t % cr;
        const i64 n = t / cr;
        flat[idx] = x[(n * C + s + cl) * P + p];
    }
}

template <typename U>
__device__ __forceinline__ void unpack_impl(const U* __restrict__ flat, U* __restrict__ x,
                                            const i64* __restrict__ starts, i64 R, i64 N, i64 C,
                                            i64 P) {
    const i64 q = N * P;
    const i64 total = q * C;
    DC_GRID_STRIDE(idx, total) {
        i64 t = idx;
        const i64 p = t % P;
        t /= P;
        const i64 ch = t % C;
        const i64 n = t / C;
        const i64 r = dc_find_block(starts, R, ch);
        const i64 s = starts[r];
        const i64 cr = starts[r + 1] - s;
        x[idx] = flat[q * s + (n * cr + (ch - s)) * P + p];
    }
}

#define DC_INSTANTIATE(U, SUF)                                                               \
    extern "C" __global__ void pack_channel_blocks_##SUF(const U* x, U* flat,                \
                                                         const i64* starts, i64 R, i64 N,    \
                                                         i64 C, i64 P) {                     \
        pack_impl<U>(x, flat, starts, R, N, C, P);                                           \
    }                                                                                        \
    extern "C" __global__ void unpack_channel_blocks_##SUF(const U* flat, U* x,              \
                                                           const i64* starts, i64 R, i64 N,  \
                                                           i64 C, i64 P) {                   \
        unpack_impl<U>(flat, x, starts, R, N, C, P);                                         \
    }

DC_INSTANTIATE(unsigned char, b1)
DC_INSTANTIATE(unsigned short, b2)
DC_INSTANTIATE(unsigned int, b4)
DC_INSTANTIATE(unsigned long long, b8)

#undef DC_INSTANTIATE
