"""The CPU's mask selection as a compiled kernel: per row, the k lowest scores with ties broken
leftmost first — exactly `masks.lowest_reference`'s masks (tested bit for bit), at ~1 G weights/s
on 2 cores against numpy's ~0.2 (results/SELECT.md).

Built from the source below with the system's C++ compiler on first use, cached by content hash
(source, flags, compiler, CPU flags) and loaded through ctypes. A cached library is loaded only
if this user owns it and its folder and nobody else can write either (the trust of the user's own
virtual environment); otherwise it is built again in a private temporary folder. Without a
compiler, `native_lowest` answers None and the reference selection runs (one warning).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from prunerzero.core.paths import cache_dir

# ------------------------------------------------------------------ native selection (CPU)
# numpy's introselect finds a row's k-th lowest at ~0.2 G weights/s on 2 cores; the kernel below
# does the whole mask in one read of the scores at ~1-2 G/s (results/SELECT.md): per row, a few
# rounds of two pivots from a 16-value sample, one vectorised count to see where the k-th lies and
# a compaction of that part (AVX-512 register compress where the CPU has it), then the tie pass
# in L1. It is compiled once per machine with the system's C++ compiler into the cache, by
# content hash (source, flags, compiler, CPU flags), and loaded through ctypes: no torch headers,
# so the first build takes about a second. Where no compiler is found the reference path runs.

NATIVE_SOURCE = r"""
// prunerzero pruning/select_native.py: per row of a matrix, mark the k lowest values, ties broken
// leftmost first (a stable sort's choice). Rows without NaN only: a row with one returns 1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

template <typename T>
int64_t count_nan(const T* x, int64_t n) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += x[i] != x[i];
  return c;
}

// a = #(x < lo), b = #(x <= hi)
template <typename T>
void count2(const T* x, int64_t n, T lo, T hi, int64_t& a, int64_t& b) {
  int64_t p = 0, q = 0;
  for (int64_t i = 0; i < n; ++i) { p += x[i] < lo; q += x[i] <= hi; }
  a = p; b = q;
}

// the x in [lo, hi], in order, to dst (x itself allowed; 16 values of slack past the end)
template <typename T>
int64_t compact(const T* x, int64_t n, T lo, T hi, T* dst) {
  int64_t w = 0;
  for (int64_t i = 0; i < n; ++i) { T v = x[i]; dst[w] = v; w += (v >= lo) & (v <= hi); }
  return w;
}

#ifdef __AVX512F__
template <>
int64_t compact<float>(const float* x, int64_t n, float lo, float hi, float* dst) {
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  int64_t w = 0, i = 0;
  for (; i < n; i += 16) {
    __mmask16 t = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(t, x + i);
    __mmask16 keep = _mm512_mask_cmp_ps_mask(t, v, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, vhi, _CMP_LE_OQ);
    _mm512_storeu_ps(dst + w, _mm512_maskz_compress_ps(keep, v));  // register compress: fast on every AVX-512 core
    w += __builtin_popcount(keep);
  }
  return w;
}
#endif

// the k-th lowest (1 <= k <= m) of a few values: the v with #(< v) < k <= #(<= v)
template <typename T>
T small_kth(const T* b, int64_t m, int64_t k) {
  for (int64_t i = 0;; ++i) {
    T v = b[i];
    int64_t lt = 0, le = 0;
    for (int64_t j = 0; j < m; ++j) { lt += b[j] < v; le += b[j] <= v; }
    if (lt < k && k <= le) return v;
  }
}

constexpr int SAMPLE = 16;  // values sampled per round for the two pivots
constexpr int REACH = 2;    // the pivots: this many sample ranks either side of the target's
constexpr int64_t SMALL = 48;

// the k-th lowest (1 <= k <= n) of x[0..n), no NaN; buf: n + 16 values of scratch.
// Each round: two pivots from a sample bracket the target's rank, one count places it below,
// between or above them, and that part is compacted into buf (in place after the first round).
template <typename T>
T kth_lowest(const T* x, int64_t n, int64_t k, T* buf) {
  const T inf = std::numeric_limits<T>::infinity();
  const T* src = x;
  int64_t m = n;
  while (m > SMALL) {
    T s[SAMPLE];
    for (int j = 0; j < SAMPLE; ++j) s[j] = src[(j * m + m / 2) / SAMPLE];
    int c = (int)((double)k / (double)m * (SAMPLE + 1)) - 1;  // the target's rank in the sample
    int r1 = std::max(0, c - REACH), r2 = std::min(SAMPLE - 1, c + REACH);
    T lo = s[0], hi = s[0];
    for (int i = 0; i < SAMPLE; ++i) {  // sample ranks by counting: no branchy sort
      int lt = 0, le = 0;
      for (int j = 0; j < SAMPLE; ++j) { lt += s[j] < s[i]; le += s[j] <= s[i]; }
      if (lt <= r1 && r1 < le) lo = s[i];
      if (lt <= r2 && r2 < le) hi = s[i];
    }
    int64_t a, b;
    count2(src, m, lo, hi, a, b);
    T from, to;
    if (k <= a) { from = -inf; to = std::nextafter(lo, -inf); }       // x < lo
    else if (k <= b) {                                                // lo <= x <= hi
      if (lo == hi) return lo;
      from = lo; to = hi; k -= a;
    } else { from = std::nextafter(hi, inf); to = inf; k -= b; }       // x > hi
    int64_t w = compact(src, m, from, to, buf);
    src = buf;
    if (w == m) break;  // all of them tied within the band: the small select finishes
    m = w;
  }
  return small_kth(src, m, k);
}

template <typename T>
void count_at(const T* x, int64_t n, T kth, int64_t& lt, int64_t& eq) {
  int64_t a = 0, b = 0;
  for (int64_t i = 0; i < n; ++i) { a += x[i] < kth; b += x[i] == kth; }
  lt = a; eq = b;
}

// all below kth, then the leftmost equal ones while seen < room (seen: equal ones left of x)
template <typename T>
void write_mask(const T* x, int64_t n, T kth, int64_t room, int64_t seen, bool all_ties, uint8_t* out) {
  if (all_ties) {
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] <= kth;
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const bool at = x[i] == kth;
    out[i] = (x[i] < kth) | (at & (seen < room));
    seen += at;
  }
}

template <typename T>
void mark_row(const T* x, int64_t n, int64_t k, T kth, uint8_t* out) {
  int64_t lt, eq;
  count_at(x, n, kth, lt, eq);
  const int64_t room = k - lt;  // how many of the values equal to the k-th are pruned
  write_mask(x, n, kth, room, 0, eq == room, out);
}

template <typename T>
int select_range(const T* x, int64_t r0, int64_t r1, int64_t n, int64_t k, uint8_t* out) {
  std::vector<T> buf(n + 16);
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = x + r * n;
    if (count_nan(row, n)) return 1;
    mark_row(row, n, k, kth_lowest(row, n, k, buf.data()), out + r * n);
  }
  return 0;
}

// rows split across plain threads that block when done (no spinning against torch's pool)
template <typename T>
int select_rows(const T* x, int64_t rows, int64_t n, int64_t k, uint8_t* out, int threads) {
  if (threads > rows) threads = (int)rows;
  if (threads <= 1 || rows * n < (1 << 16)) return select_range(x, 0, rows, n, k, out);
  std::vector<std::thread> pool;
  std::vector<int> rc(threads, 0);
  for (int t = 1; t < threads; ++t)
    pool.emplace_back([&, t] { rc[t] = select_range(x, rows * t / threads, rows * (t + 1) / threads, n, k, out); });
  rc[0] = select_range(x, 0, rows / threads, n, k, out);
  for (auto& th : pool) th.join();
  int any = 0;
  for (int v : rc) any |= v;
  return any;
}

}  // namespace

extern "C" int pz_select_f32(const float* x, int64_t rows, int64_t n, int64_t k, uint8_t* out, int threads) {
  return select_rows(x, rows, n, k, out, threads);
}
extern "C" int pz_select_f64(const double* x, int64_t rows, int64_t n, int64_t k, uint8_t* out, int threads) {
  return select_rows(x, rows, n, k, out, threads);
}
"""
NATIVE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-pthread")
# narrower rows (N:M groups past SHORT_GROUP: 16:32) stay on the reference path, faster there:
# 344 ms against the kernel's 575 ms for smollm2-135m's 16:32 groups (results/SELECT.md)
NATIVE_MIN_WIDTH = 64
_NATIVE_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f32", torch.bfloat16: "f32"}


def native_lowest(scores: torch.Tensor, k: int) -> torch.Tensor | None:
    """`_lowest` of a CPU tensor by the native kernel, for 1 <= k <= width; None where it does
    not apply (no compiler, another dtype, rows narrower than NATIVE_MIN_WIDTH, a NaN in the
    scores): the caller takes the reference
    path. float16 and bfloat16 scores are widened to float32 first (exact, order kept)."""
    kernels = _native_kernels()
    kind = _NATIVE_DTYPES.get(scores.dtype)
    if kernels is None or kind is None or scores.dim() != 2 or not 1 <= k <= scores.shape[1]:
        return None
    if scores.shape[1] < NATIVE_MIN_WIDTH:
        return None
    x = scores.detach()
    x = (x.float() if kind == "f32" and x.dtype != torch.float32 else x).contiguous()
    out = torch.empty(x.shape, dtype=torch.bool)
    if x.numel() and kernels[kind](x.data_ptr(), x.shape[0], x.shape[1], k, out.data_ptr(), torch.get_num_threads()):
        return None  # a NaN: the reference path orders it as it always did
    return out


@functools.cache
def _native_kernels() -> dict | None:
    """{"f32": fn, "f64": fn} from the compiled kernel, or None (with a warning) without one."""
    try:
        path = _native_library()
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        warnings.warn(f"native mask selection unavailable ({e}); masks use the reference selection", stacklevel=2)
        return None
    kernels = {}
    for kind in ("f32", "f64"):
        fn = getattr(lib, f"pz_select_{kind}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
        kernels[kind] = fn
    return kernels


def _native_library() -> Path:
    """The compiled kernel's path in the cache, built there first if missing. A unique
    temporary file + os.replace: processes building at once never load a half-written file."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler (g++, c++ or $CXX) found")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([NATIVE_SOURCE, *NATIVE_FLAGS, version, platform.machine(), _cpu_flags()]).encode())
    path = cache_dir("kernels") / f"select-{key.hexdigest()[:16]}.so"
    if not _trusted(path.parent):
        warnings.warn(f"{path.parent} is not this user's alone: the selection kernel is built in a private folder",
                      stacklevel=3)
        path = Path(tempfile.mkdtemp(prefix="prunerzero-kernel-")) / path.name  # mode 0700
    if path.is_file() and _trusted(path):
        return path
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, lib = Path(tmp) / "select.cpp", Path(tmp) / path.name
        src.write_text(NATIVE_SOURCE)
        done = subprocess.run([compiler, *NATIVE_FLAGS, "-o", str(lib), str(src)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(lib, path)
    return path


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so that a cache shared between machines never hands one
    a kernel built for another's instructions (-march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _trusted(path: Path) -> bool:
    """Owned by this user and writable by nobody else: loading it runs only what this user put there."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
