"""CUDA kernels (kernels/*.cu), their loader distconv.cudakernels and their launchers
(distconv.ops.cuda, distconv.packing), with and without a GPU.

Without a GPU:

* every ``kernels/*.cu`` compiles with nvcc (``-cubin -arch=sm_80``) and its entry
  points and parameter types are exactly those ``cudakernels.KERNELS`` launches;
* the source ``cudakernels`` hands to CuPy (headers pasted in) compiles with NVRTC,
  when CuPy and its NVRTC library load;
* the CUDA sources RUN on the CPU: g++ builds them against a small host emulation
  of the CUDA built-ins, and the GPU functions of the launchers drive them with
  NumPy standing in for CuPy (device ``emu``); results must equal the NumPy twins;
* the NumPy twins match independent references: torch float64 and
  ``comm._pack``/``comm._assemble``.

With CuPy and a GPU (``-m gpu``; skipped otherwise): the same kernel-vs-twin tests
on the real device (device ``gpu``), float32 and float64, and the cuDNN path.
"""
import ctypes
import os
import re
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from distconv import cudakernels as CK
from distconv.ops import cuda as K
from tests.tolerance import rel_err

torch.set_num_threads(1)

KDIR = K.kernels_dir()
CU_FILES = sorted(f for f in os.listdir(KDIR) if f.endswith(".cu"))
DTYPES = [np.float32, np.float64]
# nvcc flags matching K.COMPILE_OPTIONS (NVRTC and nvcc spell these the same)
NVCC_FLAGS = list(K.COMPILE_OPTIONS)




def assert_close(actual, expected, dtype, what="", tol=None):
    dtype = np.dtype(dtype)
    assert np.asarray(actual).dtype == dtype, f"{what}: dtype {np.asarray(actual).dtype} != {dtype}"
    if tol is None:
        tol = 1e-10 if dtype == np.float64 else 1e-4
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# ============================================================ (a) compilation
@pytest.fixture(scope="module")
def nvcc_build(tmp_path_factory):
    """Compile every .cu (in parallel) to a cubin, keeping the PTX: {file: (rc, log, dir)}."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH")
    root = tmp_path_factory.mktemp("nvcc")
    procs = {}
    for f in CU_FILES:
        d = root / f[:-3]
        d.mkdir()
        cmd = [nvcc, "-cubin", "-arch=sm_80", *NVCC_FLAGS, "-I", KDIR, "--keep", "--keep-dir",
               str(d), "-o", str(d / (f[:-3] + ".cubin")), os.path.join(KDIR, f)]
        procs[f] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True), d)
    out = {}
    for f, (p, d) in procs.items():
        log, _ = p.communicate(timeout=600)
        out[f] = (p.returncode, log, d)
    return out


def test_kernel_table_covers_sources():
    assert sorted(K.KERNELS) == CU_FILES
    assert os.path.isfile(os.path.join(KDIR, "common.cuh"))


@pytest.mark.parametrize("cu", CU_FILES)
def test_nvcc_compiles(nvcc_build, cu):
    rc, log, _ = nvcc_build[cu]
    assert rc == 0, f"nvcc failed on kernels/{cu}:\n{log}"


_PTX_TYPE = {"P": "u64", "i": "u64", "f": "f32", "d": "f64"}


@pytest.mark.parametrize("cu", CU_FILES)
def test_entry_points_match_launch_table(nvcc_build, cu):
    """Names and parameter types of the kernels == what the launchers pass (KERNELS)."""
    rc, log, d = nvcc_build[cu]
    assert rc == 0, log
    ptx = (d / (cu[:-3] + ".ptx")).read_text()
    found = {}
    for name, params in re.findall(r"\.entry\s+(\w+)\s*\(([^)]*)\)", ptx):
        found[name] = re.findall(r"\.param\s+\.(\w+)", params)
    expected = {name: [_PTX_TYPE[k] for k in sig] for name, sig in K.KERNELS[cu].items()}
    assert found == expected


def _nvrtc():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:
        return None


@pytest.mark.parametrize("cu", CU_FILES)
def test_nvrtc_compiles_module_source(cu):
    """The exact text RawModule gets, with the options CuPy adds (-ftz=true, -arch, ...)."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("CuPy's NVRTC library is not available")
    src = K.kernel_source(cu)
    assert not re.search(r'^\s*#\s*include', src, re.M)
    prog = nvrtc.createProgram(src, cu, [], [])
    opts = list(K.COMPILE_OPTIONS) + ["-ftz=true", "-arch=compute_80",
                                      "--device-as-default-execution-space"]
    try:
        nvrtc.compileProgram(prog, opts)
        ptx = nvrtc.getPTX(prog)
    except Exception as e:
        pytest.fail(f"NVRTC failed on kernels/{cu}: {e}\n{nvrtc.getProgramLog(prog)}")
    finally:
        nvrtc.destroyProgram(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert set(re.findall(r"\.entry\s+(\w+)", ptx)) == set(K.KERNELS[cu])


def test_imports_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None; sys.modules['cupyx'] = None\n"
            "import numpy as np, distconv.ops.cuda as K\n"
            "x = np.arange(24.0).reshape(1, 2, 3, 4)\n"
            "assert K.im2col(x, (2, 2)).shape == (1, 8, 6)\n"
            "assert not K.cudnn_available()\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(CK.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr


# ================================================= host emulation of the kernels
EMU_SHIM = r"""
// Host emulation of the CUDA built-ins used by kernels/*.cu (tests only).
// A launch is emulated by calling the kernel once per (block, thread) in turn,
// so block-wide cooperation only works with one-thread blocks (reductions).
#include <cstring>
struct DcEmuDim { unsigned x, y, z; };
static DcEmuDim blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
inline void __syncthreads() {}
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, sizeof f); return f; }
inline double __longlong_as_double(long long i) {
    double d; std::memcpy(&d, &i, sizeof d); return d; }
inline double __shfl_down_sync(unsigned, double, int) { return 0.0; }  // one-thread blocks
extern "C" void dc_emu_set(unsigned b, unsigned g, unsigned t, unsigned n) {
    blockIdx.x = b; gridDim.x = g; threadIdx.x = t; blockDim.x = n;
    blockIdx.y = blockIdx.z = threadIdx.y = threadIdx.z = 0;
    gridDim.y = gridDim.z = blockDim.y = blockDim.z = 1;
}
"""

_CTYPE = {"P": ctypes.c_void_p, "i": ctypes.c_longlong, "f": ctypes.c_float,
          "d": ctypes.c_double}


class Emulator:
    """Runs the CUDA kernels compiled for the host; a drop-in for ``cudakernels.launch``."""

    GRID, BLOCK = 3, 5  # odd sizes: grid-stride loops must cover the rest

    def __init__(self, libs):
        self.libs = libs

    def launch(self, name, total, args, threads=CK.THREADS, blocks=None):
        sig = CK.SIGNATURE[name]
        assert len(args) == len(sig), (name, len(args), len(sig))
        cargs = []
        for i, (kind, a) in enumerate(zip(sig, args)):
            if kind == "P":
                assert isinstance(a, np.ndarray) and a.flags.c_contiguous, (name, i)
                cargs.append(a.ctypes.data)
            elif kind == "i":
                assert isinstance(a, (int, np.integer)), (name, i, type(a))
                cargs.append(int(a))
            else:
                assert isinstance(a, (float, np.floating)), (name, i, type(a))
                cargs.append(float(a))
        lib = self.libs[CK.FILE_OF[name]]
        fn = getattr(lib, name)
        fn.argtypes = [_CTYPE[k] for k in sig]
        fn.restype = None
        if "_partial_" in name:  # block reductions: one-thread blocks, grid-stride over blocks
            assert threads == CK.RED_THREADS and blocks >= 1
            grid, block = min(int(blocks), self.GRID), 1
        else:
            assert total >= 1, f"{name} launched with nothing to do"
            grid, block = min(self.GRID, -(-int(total) // self.BLOCK)), self.BLOCK
        for b in range(grid):
            for t in range(block):
                lib.dc_emu_set(b, grid, t, block)
                fn(*cargs)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the host emulation of the kernels")
    root = tmp_path_factory.mktemp("emu")
    shim = root / "cuda_host_emulation.h"
    shim.write_text(EMU_SHIM)
    procs = {}
    for f in CU_FILES:
        so = root / (f[:-3] + ".so")
        cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-x", "c++",
               "-include", str(shim), "-I", KDIR, os.path.join(KDIR, f), "-o", str(so)]
        procs[f] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True), so)
    libs = {}
    for f, (p, so) in procs.items():
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"host build of kernels/{f} failed:\n{log}"
        libs[f] = ctypes.CDLL(str(so))
    return Emulator(libs)


class Dev:
    def __init__(self, name, to, get):
        self.name, self.to, self.get = name, to, get

    @property
    def exact(self):
        """Element-wise and gather kernels reproduce the twins bit for bit on the host."""
        return self.name == "emu"


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver / no device
        pytest.skip(f"CuPy sees no GPU: {e}")
    if n < 1:
        pytest.skip("CuPy sees no GPU")
    return cupy


@pytest.fixture(params=["emu", pytest.param("gpu", marks=pytest.mark.gpu)])
def dev(request, monkeypatch):
    if request.param == "emu":
        emu = request.getfixturevalue("emu")
        monkeypatch.setattr(CK, "cupy", lambda: np)
        monkeypatch.setattr(CK, "is_gpu_array", lambda a: isinstance(a, np.ndarray))
        monkeypatch.setattr(CK, "launch", emu.launch)
        monkeypatch.delenv("DISTCONV_CUDNN", raising=False)
        return Dev("emu", to=lambda a: np.array(a, copy=True), get=np.asarray)
    cupy = request.getfixturevalue("cp")
    monkeypatch.delenv("DISTCONV_CUDNN", raising=False)
    return Dev("gpu", to=cupy.asarray, get=cupy.asnumpy)


def assert_twin(dev, actual, expected, dtype, what="", tol=None):
    """Kernel result == twin: bitwise on the host emulation, to rounding on a GPU (FTZ)."""
    actual = dev.get(actual)
    assert actual.dtype == np.dtype(dtype), f"{what}: dtype {actual.dtype} != {np.dtype(dtype)}"
    if dev.exact and tol is None:
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:
        if tol is None:
            tol = 1e-13 if np.dtype(dtype) == np.float64 else 1e-6
        assert_close(actual, expected, dtype, what, tol)


# ================================================================ im2col/col2im
# (N, C, H, W, kernel, stride, padding, dilation)
CONV_CASES = [
    (2, 3, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 2, 9, 7, (3, 2), (2, 3), (1, 0), (2, 1)),    # rectangular, mixed stride/dilation
    (1, 3, 11, 10, (3, 3), (2, 2), (2, 2), (2, 2)),
    (3, 1, 5, 5, (1, 1), (2, 2), (0, 0), (1, 1)),    # 1x1 stride 2
    (2, 2, 6, 6, (5, 5), (3, 1), (3, 0), (1, 1)),    # padding > kernel//2
    (2, 2, 4, 4, (4, 4), (1, 1), (0, 0), (1, 1)),    # kernel == image -> 1x1 output
    (2, 2, 8, 1, (3, 1), (1, 1), (1, 0), (1, 1)),    # width-1 images
    (2, 2, 5, 5, (1, 1), (3, 3), (1, 1), (1, 1)),    # padded 1x1, stride 3: untouched pixels
]
EMPTY_CONV_CASES = [
    (0, 3, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 0, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
]


@pytest.mark.parametrize("case", CONV_CASES + EMPTY_CONV_CASES)
def test_im2col_col2im_numpy_vs_torch(case):
    N, C, H, W, k, s, p, d = case
    rng = rng_for("i2c", case)
    x = rng.standard_normal((N, C, H, W))
    cols = K.im2col_numpy(x, k, s, p, d)
    Ho = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    Wo = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    assert cols.shape == (N, C * k[0] * k[1], Ho * Wo) and cols.dtype == np.float64
    c = rng.standard_normal(cols.shape)
    back = K.col2im_numpy(c, x.shape, k, s, p, d)
    assert back.shape == x.shape
    if N * C == 0:
        return
    ref = TF.unfold(t64(x), k, dilation=d, padding=p, stride=s).numpy()
    np.testing.assert_array_equal(cols, ref)
    ref_back = TF.fold(t64(c), (H, W), k, dilation=d, padding=p, stride=s).numpy()
    assert_close(back, ref_back, np.float64, "col2im", 1e-13)
    # adjoint: <im2col(x), c> == <x, col2im(c)>
    assert abs(np.vdot(cols, c) - np.vdot(x, back)) <= 1e-10 * max(1.0, abs(np.vdot(cols, c)))


def test_numpy_inputs_dispatch_to_twins():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    np.testing.assert_array_equal(K.im2col(x, 3, 2, 1, 1), K.im2col_numpy(x, 3, 2, 1, 1))
    y, a = K.max_pool2d_forward(x, 2)
    y2, a2 = K.max_pool2d_forward_numpy(x, 2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(a, a2)
    with pytest.raises(ValueError, match="half of the kernel"):
        K.avg_pool2d_forward(x, 2, 2, 2)
    with pytest.raises(ValueError, match="empty"):
        K.im2col(x, 7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES + EMPTY_CONV_CASES)
def test_im2col_col2im_kernels(dev, case, dtype):
    N, C, H, W, k, s, p, d = case
    rng = rng_for("i2ck", case)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    cols = K.im2col(dev.to(x), k, s, p, d)
    ref = K.im2col_numpy(x, k, s, p, d)
    assert_twin(dev, cols, ref, dtype, "im2col")
    c = rng.standard_normal(ref.shape).astype(dtype)
    assert_twin(dev, K.col2im(dev.to(c), x.shape, k, s, p, d),
                K.col2im_numpy(c, x.shape, k, s, p, d), dtype, "col2im")


# ============================================================== channel packing
PACK_CASES = [  # (shape, counts)
    ((4, 7, 3, 5), [2, 0, 3, 2]),
    ((3, 5), [1, 1, 3]),
    ((2, 6, 4), [6]),
    ((1, 5, 2, 2), [2, 3]),
    ((3, 4, 2, 3, 2), [0, 4, 0]),
    ((5, 9, 3, 1), [3, 3, 2, 1, 0]),
    ((0, 4, 3), [2, 2]),
    ((3, 0, 2), [0, 0]),
    ((2, 3, 0), [1, 2]),
]
PACK_DTYPES = [np.float32, np.float64, np.int16, np.uint8, np.complex128, np.bool_]


def _random(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, 100, shape).astype(dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", PACK_DTYPES)
@pytest.mark.parametrize("shape,counts", PACK_CASES)
def test_pack_numpy_vs_comm(shape, counts, dtype):
    comm = pytest.importorskip("distconv.comm")
    x = _random(rng_for("pk", shape), shape, dtype)
    N, P = shape[0], int(np.prod(shape[2:], dtype=np.int64))
    flat = K.pack_channel_blocks_numpy(x, counts)
    assert flat.shape == (x.size,) and flat.dtype == x.dtype
    np.testing.assert_array_equal(flat, comm._pack(np, x, 1, counts, N, P))
    back = K.unpack_channel_blocks_numpy(flat, shape, counts)
    assert back.shape == x.shape and back.dtype == x.dtype
    np.testing.assert_array_equal(back, comm._assemble(np, flat, shape, 1, counts, N, P))
    np.testing.assert_array_equal(back, x)


def test_pack_rejects_bad_counts():
    x = np.zeros((2, 5, 3))
    with pytest.raises(ValueError, match="sum to the 5 channels"):
        K.pack_channel_blocks_numpy(x, [2, 2])
    with pytest.raises(ValueError, match="non-negative"):
        K.unpack_channel_blocks_numpy(x.reshape(-1), x.shape, [6, -1])


@pytest.mark.parametrize("dtype", PACK_DTYPES)
@pytest.mark.parametrize("shape,counts", PACK_CASES)
def test_pack_kernels(dev, shape, counts, dtype):
    x = _random(rng_for("pkk", shape), shape, dtype)
    flat = K.pack_channel_blocks(dev.to(x), counts)
    ref = K.pack_channel_blocks_numpy(x, counts)
    np.testing.assert_array_equal(dev.get(flat), ref)
    back = K.unpack_channel_blocks(dev.to(ref), shape, counts)
    assert tuple(back.shape) == shape
    np.testing.assert_array_equal(dev.get(back), x)


# ================================================================== batch norm
BN_SHAPES = [(4, 5, 7, 9), (3, 2, 40, 40), (5, 3, 1, 1), (1, 1, 3, 3)]


def _bn_torch(x, weight, bias, dy, eps):
    xt = t64(x, True)
    wt = t64(weight, True) if weight is not None else None
    bt = t64(bias, True) if bias is not None else None
    yt = TF.batch_norm(xt, None, None, wt, bt, training=True, eps=eps)
    yt.backward(t64(dy))
    return yt.detach().numpy(), xt.grad.numpy()


def _bn_chain(mod, x, weight, bias, dy, eps, suffix=""):
    """The SyncBN sequence of the ops (one 'rank'), through K.<name><suffix>."""
    f = {n: getattr(mod, n + suffix) for n in ("bn_local_stats", "bn_forward_apply",
                                                "bn_backward_reduce", "bn_backward_apply")}
    s, ss, n = f["bn_local_stats"](x)
    s, ss = np.asarray(s), np.asarray(ss)
    mean = s / n
    var = np.maximum(ss / n - mean * mean, 0.0)
    invstd = 1.0 / np.sqrt(var + eps)
    y = f["bn_forward_apply"](x, mean, invstd, weight, bias)
    sdy, sdyx = f["bn_backward_reduce"](dy, x, mean)
    dx = f["bn_backward_apply"](dy, x, mean, invstd, weight, sdy, sdyx, n)
    return (s, ss, n), y, (sdy, sdyx), dx, (mean, invstd)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_bn_numpy_vs_torch(shape, dtype, affine):
    rng = rng_for("bn", shape)
    C = shape[1]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype) if affine else None
    b = rng.standard_normal(C).astype(dtype) if affine else None
    _, y, _, dx, _ = _bn_chain(K, x, w, b, dy, 1e-5, "_numpy")
    yr, dxr = _bn_torch(x, w, b, dy, 1e-5)
    assert_close(y, yr, dtype, "y")
    assert_close(dx, dxr, dtype, "dx")


def test_bn_numpy_empty():
    x = np.zeros((0, 3, 4, 4), np.float32)
    s, ss, n = K.bn_local_stats_numpy(x)
    assert s.shape == (3,) and n == 0 and not s.any() and not ss.any()
    sdy, sdyx = K.bn_backward_reduce_numpy(x, x, np.zeros(3))
    assert sdy.shape == (3,) and not sdy.any()
    assert K.bn_forward_apply_numpy(x, np.zeros(3), np.ones(3)).shape == x.shape


@pytest.mark.parametrize("parts", [None, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES + [(0, 3, 4, 4), (2, 0, 3, 3)])
def test_bn_kernels(dev, monkeypatch, shape, dtype, parts):
    if parts is not None:  # several partial sums per channel, some of them empty
        monkeypatch.setattr(K.batchnorm, "_bn_parts", lambda C, M: parts)
    rng = rng_for("bnk", shape)
    C = shape[1]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    (s, ss, n) = K.bn_local_stats(dev.to(x))
    (s0, ss0, n0) = K.bn_local_stats_numpy(x)
    assert n == n0
    assert_twin(dev, s, s0, np.float64, "sum", 1e-13)
    assert_twin(dev, ss, ss0, np.float64, "sumsq", 1e-13)
    if n == 0 or C == 0:
        sdy, sdyx = K.bn_backward_reduce(dev.to(dy), dev.to(x), np.zeros(C))
        assert dev.get(sdy).shape == (C,) and not dev.get(sdy).any()
        assert K.bn_forward_apply(dev.to(x), np.zeros(C), np.ones(C)).shape == shape
        return
    mean = s0 / n
    invstd = 1.0 / np.sqrt(np.maximum(ss0 / n - mean * mean, 0.0) + 1e-5)
    for wb in ((w, b), (None, None)):
        assert_twin(dev, K.bn_forward_apply(dev.to(x), dev.to(mean), dev.to(invstd), *wb),
                    K.bn_forward_apply_numpy(x, mean, invstd, *wb), dtype, "y")
    sdy, sdyx = K.bn_backward_reduce(dev.to(dy), dev.to(x), dev.to(mean))
    sdy0, sdyx0 = K.bn_backward_reduce_numpy(dy, x, mean)
    assert_twin(dev, sdy, sdy0, np.float64, "sum_dy", 1e-12)
    assert_twin(dev, sdyx, sdyx0, np.float64, "sum_dy_xmu", 1e-12)
    for wt in (w, None):
        dx = K.bn_backward_apply(dev.to(dy), dev.to(x), mean, invstd, wt, sdy0, sdyx0, n)
        assert_twin(dev, dx, K.bn_backward_apply_numpy(dy, x, mean, invstd, wt, sdy0, sdyx0, n),
                    dtype, "dx")


# ===================================================================== pooling
POOL_CASES = [  # (N, C, H, W, kernel, stride, padding)
    (2, 3, 7, 9, (3, 3), (2, 2), (1, 1)),
    (2, 3, 8, 8, (2, 2), (2, 2), (0, 0)),
    (1, 2, 9, 7, (3, 2), (1, 2), (1, 0)),
    (2, 2, 5, 5, (5, 5), (1, 1), (2, 2)),
    (1, 2, 6, 5, (2, 3), None, (1, 1)),
    (1, 1, 20, 20, (17, 17), (3, 3), (0, 0)),   # kh*kw > 256: int32 argmax
    (0, 3, 6, 6, (3, 3), (2, 2), (1, 1)),
    (2, 0, 6, 6, (2, 2), (2, 2), (0, 0)),
]


def _pool_input(rng, shape, dtype):
    # small integers: many ties, which must break as in PyTorch
    return rng.integers(-3, 4, shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_numpy_vs_torch(case, dtype):
    N, C, H, W, k, s, p = case
    rng = rng_for("pool", case)
    x = _pool_input(rng, (N, C, H, W), dtype)
    y, arg = K.max_pool2d_forward_numpy(x, k, s, p)
    ya = K.avg_pool2d_forward_numpy(x, k, s, p)
    assert arg.dtype == (np.uint8 if k[0] * k[1] <= 256 else np.int32)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = K.max_pool2d_backward_numpy(dy, arg, x.shape, k, s, p)
    dxa = K.avg_pool2d_backward_numpy(dy, x.shape, k, s, p)
    assert dx.shape == dxa.shape == x.shape
    if C == 0:
        assert y.shape[:2] == ya.shape[:2] == (N, 0)
        return
    for fn, yy, dd in ((TF.max_pool2d, y, dx), (TF.avg_pool2d, ya, dxa)):
        xt = t64(x, True)
        yt = fn(xt, k, s, p)
        if yt.numel():
            yt.backward(t64(dy))
        assert_close(yy, yt.detach().numpy(), dtype, fn.__name__)
        gref = xt.grad.numpy() if xt.grad is not None else np.zeros(x.shape)
        assert_close(dd, gref, dtype, fn.__name__ + " backward")


def test_max_pool_numpy_nan_and_padding():
    x = -np.arange(1.0, 26.0).reshape(1, 1, 5, 5)
    x[0, 0, 3, 3] = np.nan
    xt = t64(x, True)
    yt = TF.max_pool2d(xt, 3, 2, 1)
    yt.backward(torch.ones_like(yt))
    y, arg = K.max_pool2d_forward_numpy(x, (3, 3), (2, 2), (1, 1))
    dx = K.max_pool2d_backward_numpy(np.ones_like(y), arg, x.shape, (3, 3), (2, 2), (1, 1))
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(dx, xt.grad.numpy())


def test_max_pool_argmax_matches_cpu_op():
    """GPU and CPU argmax use one encoding, so either backward accepts either forward's."""
    from distconv.ops import pool as P
    rng = np.random.default_rng(3)
    x = _pool_input(rng, (2, 3, 7, 9), np.float32)
    y, arg = K.max_pool2d_forward_numpy(x, 3, 2, 1)
    y2, arg2 = P.max_pool2d_forward(x, 3, 2, 1)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(arg, arg2)
    assert arg.dtype == arg2.dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_kernels(dev, case, dtype):
    N, C, H, W, k, s, p = case
    rng = rng_for("poolk", case)
    x = _pool_input(rng, (N, C, H, W), dtype)
    if x.size:
        x.flat[rng.integers(0, x.size, 3)] = np.nan
    y, arg = K.max_pool2d_forward(dev.to(x), k, s, p)
    y0, arg0 = K.max_pool2d_forward_numpy(x, k, s, p)
    assert_twin(dev, y, y0, dtype, "max y")
    np.testing.assert_array_equal(dev.get(arg), arg0)
    assert dev.get(arg).dtype == arg0.dtype
    dy = rng.standard_normal(y0.shape).astype(dtype)
    assert_twin(dev, K.max_pool2d_backward(dev.to(dy), arg, x.shape, k, s, p),
                K.max_pool2d_backward_numpy(dy, arg0, x.shape, k, s, p), dtype, "max dx")
    x = rng.standard_normal(x.shape).astype(dtype)
    assert_twin(dev, K.avg_pool2d_forward(dev.to(x), k, s, p),
                K.avg_pool2d_forward_numpy(x, k, s, p), dtype, "avg y")
    assert_twin(dev, K.avg_pool2d_backward(dev.to(dy), x.shape, k, s, p),
                K.avg_pool2d_backward_numpy(dy, x.shape, k, s, p), dtype, "avg dx")


POOL_MODE_CASES = [  # (N, C, H, W, kernel, stride, padding): ceil mode adds clipped windows
    (2, 3, 8, 10, (3, 3), (2, 2), (0, 0)),
    (1, 2, 5, 6, (2, 2), (2, 2), (1, 1)),     # PyTorch's last-window rule drops one in H
    (1, 3, 8, 11, (3, 4), (2, 3), (1, 2)),    # windows past the right padding
    (2, 2, 13, 13, (3, 3), (2, 2), (0, 0)),
    (1, 1, 20, 19, (17, 16), (2, 3), (0, 0)),  # int32 argmax
    (0, 2, 7, 7, (3, 3), (2, 2), (1, 1)),
]
POOL_MODES = [(c, cip) for c in (False, True) for cip in (True, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ceil_mode,count_include_pad", POOL_MODES)
@pytest.mark.parametrize("case", POOL_MODE_CASES)
def test_pool_modes_numpy_vs_torch(case, ceil_mode, count_include_pad, dtype):
    N, C, H, W, k, s, p = case
    rng = rng_for("poolm", case, ceil_mode, count_include_pad)
    x = _pool_input(rng, (N, C, H, W), dtype)
    if x.size:
        x.flat[rng.integers(0, x.size, 3)] = -np.inf
    y, arg = K.max_pool2d_forward_numpy(x, k, s, p, ceil_mode=ceil_mode)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = K.max_pool2d_backward_numpy(dy, arg, x.shape, k, s, p, ceil_mode=ceil_mode)
    xt = t64(x, True)
    yt = TF.max_pool2d(xt, k, s, p, ceil_mode=ceil_mode)
    yt.backward(t64(dy))
    np.testing.assert_array_equal(y, yt.detach().numpy().astype(dtype))
    assert_close(dx, xt.grad.numpy(), dtype, "max dx")
    x = rng.standard_normal(x.shape).astype(dtype)
    kw = dict(ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    ya = K.avg_pool2d_forward_numpy(x, k, s, p, **kw)
    dxa = K.avg_pool2d_backward_numpy(dy, x.shape, k, s, p, **kw)
    xt = t64(x, True)
    yt = TF.avg_pool2d(xt, k, s, p, **kw)
    yt.backward(t64(dy))
    assert_close(ya, yt.detach().numpy(), dtype, "avg y")
    assert_close(dxa, xt.grad.numpy(), dtype, "avg dx")


def test_max_pool_all_neg_inf_window_numpy():
    """A window whose in-bounds values are all -inf sends its gradient to its first
    in-bounds element, as PyTorch does, not into the padding."""
    x = np.full((1, 1, 4, 5), -np.inf)
    x[0, 0, 2:, 3:] = 1.0
    xt = t64(x, True)
    yt = TF.max_pool2d(xt, 3, 2, 1, ceil_mode=True)
    yt.backward(torch.ones_like(yt))
    y, arg = K.max_pool2d_forward_numpy(x, 3, 2, 1, ceil_mode=True)
    dx = K.max_pool2d_backward_numpy(np.ones_like(y), arg, x.shape, 3, 2, 1, ceil_mode=True)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(dx, xt.grad.numpy())
    assert dx.sum() == y.size  # nothing lost in the padding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ceil_mode,count_include_pad", POOL_MODES)
@pytest.mark.parametrize("case", POOL_MODE_CASES)
def test_pool_mode_kernels(dev, case, ceil_mode, count_include_pad, dtype):
    N, C, H, W, k, s, p = case
    rng = rng_for("poolmk", case, ceil_mode, count_include_pad)
    x = _pool_input(rng, (N, C, H, W), dtype)
    if x.size:
        x.flat[rng.integers(0, x.size, 3)] = np.nan
        x.flat[rng.integers(0, x.size, 3)] = -np.inf
    y, arg = K.max_pool2d_forward(dev.to(x), k, s, p, ceil_mode=ceil_mode)
    y0, arg0 = K.max_pool2d_forward_numpy(x, k, s, p, ceil_mode=ceil_mode)
    assert_twin(dev, y, y0, dtype, "max y")
    np.testing.assert_array_equal(dev.get(arg), arg0)
    dy = rng.standard_normal(y0.shape).astype(dtype)
    assert_twin(dev, K.max_pool2d_backward(dev.to(dy), arg, x.shape, k, s, p,
                                           ceil_mode=ceil_mode),
                K.max_pool2d_backward_numpy(dy, arg0, x.shape, k, s, p, ceil_mode=ceil_mode),
                dtype, "max dx")
    x = rng.standard_normal(x.shape).astype(dtype)
    kw = dict(ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    assert_twin(dev, K.avg_pool2d_forward(dev.to(x), k, s, p, **kw),
                K.avg_pool2d_forward_numpy(x, k, s, p, **kw), dtype, "avg y")
    assert_twin(dev, K.avg_pool2d_backward(dev.to(dy), x.shape, k, s, p, **kw),
                K.avg_pool2d_backward_numpy(dy, x.shape, k, s, p, **kw), dtype, "avg dx")


def test_cpu_op_dispatches_pool_modes_to_kernels(dev, monkeypatch):
    """distconv.ops.pool hands ceil_mode/count_include_pad to the CUDA path unchanged."""
    from distconv.ops import _gpu
    from distconv.ops import pool as P
    monkeypatch.setattr(_gpu, "array_module", lambda a: None)  # every array 'is' on the GPU
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 8, 11))
    k, s, p = (3, 4), (2, 3), (1, 2)
    y, arg = P.max_pool2d_forward(x, k, s, p, ceil_mode=True)
    y0, arg0 = K.max_pool2d_forward_numpy(x, k, s, p, ceil_mode=True)
    assert_twin(dev, y, y0, np.float64, "max y")
    ya = P.avg_pool2d_forward(x, k, s, p, ceil_mode=True, count_include_pad=False)
    assert_twin(dev, ya, K.avg_pool2d_forward_numpy(x, k, s, p, ceil_mode=True,
                                                    count_include_pad=False), np.float64, "avg")


# ======================================================================== ReLU
def _relu_input(dtype):
    x = np.random.default_rng(4).standard_normal((3, 4, 5, 7)).astype(dtype)
    x.flat[:6] = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-3]
    return x


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_numpy_vs_torch(dtype):
    x = _relu_input(dtype)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(dtype)
    y = K.relu_forward_numpy(x)
    np.testing.assert_array_equal(y, torch.relu(torch.from_numpy(x)).numpy())
    dx = K.relu_backward_numpy(dy, y)
    ref = torch.ops.aten.threshold_backward(torch.from_numpy(dy), torch.from_numpy(y), 0).numpy()
    np.testing.assert_array_equal(dx, ref)
    out = x.copy()
    assert K.relu_forward_numpy(out, out=out) is out
    np.testing.assert_array_equal(out, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_kernels(dev, dtype):
    x = _relu_input(dtype)
    dy = np.random.default_rng(6).standard_normal(x.shape).astype(dtype)
    y = K.relu_forward(dev.to(x))
    y0 = K.relu_forward_numpy(x)
    assert_twin(dev, y, y0, dtype, "relu")
    assert_twin(dev, K.relu_backward(dev.to(dy), y), K.relu_backward_numpy(dy, y0), dtype,
                "relu backward")
    xd = dev.to(x)
    assert K.relu_forward(xd, out=xd) is xd  # in place
    assert_twin(dev, xd, y0, dtype, "relu in place")
    xt = dev.to(x)[:, :, ::2]  # non-contiguous input and out
    assert_twin(dev, K.relu_forward(xt, out=xt), y0[:, :, ::2], dtype, "relu strided")
    e = dev.to(np.zeros((0, 3), dtype))
    assert K.relu_forward(e).shape == (0, 3) and K.relu_backward(e, e).shape == (0, 3)


# ================================================================ convolution
CONV_W_CASES = [  # (N, C, F, H, W, kernel, stride, padding, dilation)
    (2, 3, 4, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 2, 5, 9, 7, (3, 2), (2, 3), (1, 0), (2, 1)),
    (5, 3, 2, 6, 6, (1, 1), (2, 2), (0, 0), (1, 1)),
    (2, 2, 3, 5, 5, (3, 3), (3, 3), (3, 3), (1, 1)),
    (0, 3, 4, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 3, 0, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 0, 4, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
]


def _conv_data(case, dtype):
    N, C, F, H, W, k, s, p, d = case
    rng = rng_for("conv", case)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C) + k).astype(dtype)
    Ho = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    Wo = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    dy = rng.standard_normal((N, F, Ho, Wo)).astype(dtype)
    return x, w, dy, k, s, p, d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_W_CASES)
def test_conv_numpy_vs_torch(case, dtype):
    x, w, dy, k, s, p, d = _conv_data(case, dtype)
    y = K.conv2d_forward_numpy(x, w, s, p, d)
    dx = K.conv2d_backward_data_numpy(dy, w, x.shape[2:], s, p, d)
    dw = K.conv2d_backward_filter_numpy(x, dy, k, s, p, d)
    assert y.shape == dy.shape and dx.shape == x.shape and dw.shape == w.shape
    if min(x.shape[:2]) == 0 or w.shape[0] == 0:
        assert not y.any() and not dx.any() and not dw.any()
        return
    xt, wt = t64(x, True), t64(w, True)
    yt = TF.conv2d(xt, wt, None, s, p, d)
    yt.backward(t64(dy))
    assert_close(y, yt.detach().numpy(), dtype, "y")
    assert_close(dx, xt.grad.numpy(), dtype, "dx")
    assert_close(dw, wt.grad.numpy(), dtype, "dw")


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_W_CASES)
def test_conv_kernels(dev, monkeypatch, case, dtype, blocks):
    x, w, dy, k, s, p, d = _conv_data(case, dtype)
    if blocks == "many":  # column buffer of 2 samples: several GEMMs, a shorter last one
        K_, L = x.shape[1] * k[0] * k[1], dy.shape[2] * dy.shape[3]
        monkeypatch.setattr(K.conv, "_COLS_BYTES", max(1, 2 * K_ * L * np.dtype(dtype).itemsize))
    tol = 1e-12 if dtype == np.float64 else 1e-5  # GEMM order differs from the twin's
    assert_twin(dev, K.conv2d_forward(dev.to(x), dev.to(w), s, p, d),
                K.conv2d_forward_numpy(x, w, s, p, d), dtype, "y", tol)
    assert_twin(dev, K.conv2d_backward_data(dev.to(dy), dev.to(w), x.shape[2:], s, p, d),
                K.conv2d_backward_data_numpy(dy, w, x.shape[2:], s, p, d), dtype, "dx", tol)
    assert_twin(dev, K.conv2d_backward_filter(dev.to(x), dev.to(dy), k, s, p, d),
                K.conv2d_backward_filter_numpy(x, dy, k, s, p, d), dtype, "dw", tol)


def test_cudnn_flag_falls_back_without_cudnn(monkeypatch):
    monkeypatch.setenv("DISTCONV_CUDNN", "1")
    if K.cudnn_available():
        pytest.skip("cuDNN is available here")
    monkeypatch.setattr(K.conv, "_CUDNN_WARNED", False)
    with pytest.warns(RuntimeWarning, match="cupy.cudnn is not available"):
        assert not K.cudnn_enabled()
    monkeypatch.setenv("DISTCONV_CUDNN", "0")
    assert not K.cudnn_enabled()


# ======================================================= GPU only (real device)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_W_CASES[:4])
def test_cudnn_conv_matches_im2col(cp, monkeypatch, case, dtype):
    if not K.cudnn_available():
        pytest.skip("cupy.cudnn is not available")
    x, w, dy, k, s, p, d = _conv_data(case, dtype)
    x, w, dy = cp.asarray(x), cp.asarray(w), cp.asarray(dy)
    monkeypatch.setenv("DISTCONV_CUDNN", "0")
    ref = (K.conv2d_forward(x, w, s, p, d), K.conv2d_backward_data(dy, w, x.shape[2:], s, p, d),
           K.conv2d_backward_filter(x, dy, k, s, p, d))
    monkeypatch.setenv("DISTCONV_CUDNN", "1")
    assert K.cudnn_enabled()
    got = (K.conv2d_forward(x, w, s, p, d), K.conv2d_backward_data(dy, w, x.shape[2:], s, p, d),
           K.conv2d_backward_filter(x, dy, k, s, p, d))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for a, b, what in zip(got, ref, ("y", "dx", "dw")):
        assert_close(cp.asnumpy(a), cp.asnumpy(b), dtype, what, tol)


@pytest.mark.gpu
def test_compile_all_and_module_cache(cp):
    K.compile_all()
    assert K.get_module("pool.cu") is K.get_module("pool.cu")


@pytest.mark.gpu
def test_grid_stride_beyond_grid_cap(cp):
    """More elements than the capped grid has threads: the grid-stride loops finish the job."""
    n = CK.MAX_BLOCKS * CK.THREADS * 2 + 3
    x = cp.random.standard_normal(n, dtype=cp.float32)
    np.testing.assert_array_equal(cp.asnumpy(K.relu_forward(x)),
                                  cp.asnumpy(cp.where(x > 0, x, 0)))


@pytest.mark.gpu
@pytest.mark.slow
def test_pack_beyond_int32_indices(cp):
    """More than 2**31 elements: the 64-bit index math of the packing kernels."""
    shape = (3, 3, 2 ** 28 + 5)  # 2.4e9 one-byte elements
    try:
        x = cp.empty(shape, cp.uint8)
        x[...] = (cp.arange(shape[2], dtype=cp.int32) % 251).astype(cp.uint8)
        x += (cp.arange(9, dtype=cp.uint8) * 17).reshape(3, 3, 1)
        counts = [1, 0, 2]
        flat = K.pack_channel_blocks(x, counts)
        q = shape[0] * shape[2]
        assert bool(cp.array_equal(flat[:q], x[:, :1].reshape(-1)))
        assert bool(cp.array_equal(flat[q:], x[:, 1:].reshape(-1)))
        del flat
        back = K.unpack_channel_blocks(K.pack_channel_blocks(x, counts), shape, counts)
        assert bool(cp.array_equal(back, x))
    except cp.cuda.memory.OutOfMemoryError:
        pytest.skip("not enough GPU memory")


# ---------------------------------------------------------------- op dispatch
@pytest.mark.parametrize("name,args", [
    ("conv2d_forward", (np.zeros((1, 2, 4, 4)), np.zeros((3, 2, 3, 3)))),
    ("conv2d_backward_data", (np.zeros((1, 3, 2, 2)), np.zeros((3, 2, 3, 3)), (4, 4))),
    ("conv2d_backward_filter", (np.zeros((1, 2, 4, 4)), np.zeros((1, 3, 2, 2)), (3, 3))),
    ("max_pool2d_forward", (np.zeros((1, 2, 4, 4)), (2, 2))),
    ("avg_pool2d_forward", (np.zeros((1, 2, 4, 4)), (2, 2))),
    ("bn_local_stats", (np.zeros((1, 2, 4, 4)),)),
    ("relu_forward", (np.zeros((1, 2, 4, 4)),)),
])
def test_ops_dispatch_cupy_arrays_to_cuda(monkeypatch, name, args):
    """For a CuPy array, each op hands the call to the CUDA implementation in ops/cuda/;
    for a NumPy array it never does."""
    import distconv.ops as ops
    from distconv.ops import _gpu, cuda as cuda_mod
    calls = []
    monkeypatch.setattr(cuda_mod, name, lambda *a, **k: calls.append(a) or "gpu-result")
    getattr(ops, name)(*args)
    assert calls == []  # numpy input: CPU path
    monkeypatch.setattr(_gpu, "array_module", lambda a: object())  # pretend: a CuPy array
    assert getattr(ops, name)(*args) == "gpu-result"
    assert len(calls) == 1 and calls[0][0] is args[0]
