/* Batch normalization on the CPU: plain C + OpenMP, loaded by kernels/cpu.py through ctypes.
 *
 * Every input arrives as one canonical view, a dense (A, C, B) array in memory order
 * (C = channels): NCHW is (N, C, H*W); channels_last and (N, L, C) are (N*H*W, C, 1).
 * Two code paths, chosen by the length B of a channel's contiguous runs:
 *
 *   planes (B >= 32, or wide rows) channel c owns A runs ("planes") of B contiguous values.
 *       Statistics: each plane is cut into chunks of <= CHUNK_BYTES (they stay in L1); the
 *       chunks of all planes are spread evenly over the threads whatever C is, then merged
 *       per channel. The elementwise passes split the flat element range evenly and run in
 *       whole vectors that may straddle planes (masked coefficient blend at plane starts).
 *   rows (B == 1, or small B with narrow rows) the data is an (A, C*B) matrix; column j
 *       belongs to channel (j / B) % C. Vectorized across columns; narrow rows are widened
 *       (k consecutive rows form one row of W = k*C*B >= MIN_WIDTH columns). Rows are split
 *       over the threads, which work on column tiles of 128 columns with the tile's
 *       accumulators or coefficients in registers (wide rows: row loops of 32-byte vectors for
 *       the apply pass, and for bfloat16's dx); per-column results are merged across blocks,
 *       threads and the columns of a channel at the end.
 *   masks (bn_masked_*: padded sequences, (N, C, L) with a mask (N, L)) the planes path's
 *       passes on a contiguous (A, C, B) array with a byte per (a, b), selecting the real values
 *       (section "masks over planes" at the end).
 *
 * Numerics (the statistics are the only delicate part):
 *   - each chunk / row block is small enough to stay in L1/L2, and its statistics come from
 *     two passes over it: first its mean (of x - x0, x0 = its first value, so the float32
 *     sum does not grow with the offset of the data), then its M2 = sum((x - mean)^2).
 *     Never E[x^2] - E[x]^2. bfloat16 makes one pass, sums of x - x0 and of its square,
 *     about an x0 near the mean, where that cancels little (see one_pass).
 *   - chunk results (count, mean, M2) are merged in float64 with Chan's formula
 *       n = na + nb, d = mb - ma, mean = ma + d*nb/n, M2 = M2a + M2b + d^2*na*nb/n
 *     in a fixed order (planes: independent of the thread count).
 *   - float32 accumulation within a chunk (32 independent lanes), float64 across chunks.
 *   - bfloat16 loads widen (u16 << 16); stores round to nearest even (NaN -> 0x7FC0, as torch;
 *     with AVX512-BF16 one vcvtneps2bf16, which also flushes results below 2^-126 to zero).
 *   - the apply pass computes y = (x - mean_hi) * scale + shift with mean_hi = (float)mean and
 *     shift = beta - (mean - mean_hi) * scale: x - mean_hi is exact when x is near the mean, so
 *     data with a large offset (mean 1e4, std 1) keeps float32 precision in y. dx likewise:
 *     dx = k*dy + b*(x - mean) + c', c' = -k*s1/m (equal to k*dy + b*x + c, c = c' - b*mean).
 *   - the apply pass may end in relu(y + residual) (bn_train_forward_relu, bn_eval_relu), in
 *     float32 before the one rounding, and relu(BN(x))'s backward may test the forward's
 *     (x - mean) * scale + shift > 0 again in both of its passes (bn_train_backward_relu): the
 *     ResNet block tail for the traffic of BN alone.
 *
 * Memory traffic: training forward reads x twice and writes y once; backward reads x and dy
 * twice and writes dx once. Where a pass's tensors (inputs and output) do not fit in the
 * last-level cache together (bn_set_cache_bytes, default 32 MiB), the output is written with
 * non-temporal (streaming) stores where AVX-512 or AVX2 is: no read-for-ownership of the
 * output lines, and the input the pass reads is not evicted by them (see use_stream). Outputs of
 * 8 MiB and more are advised MADV_HUGEPAGE first (see advise_huge).
 *
 * Threads: the caller passes the count (torch.get_num_threads()); small inputs use fewer.
 * Loaded into a process that imported torch, this library's libgomp.so.1 resolves to the one
 * torch already loaded, so both share one OpenMP thread pool.
 *
 * Every entry point returns 0, or 1 if scratch memory could not be allocated; the training
 * forward returns 2 when it was asked to update running statistics and the batch's statistics
 * were not finite (the running statistics are then left as they were).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAVE_AVX512 1 /* explicit vector code: short-plane reductions, streaming stores */
#else
#define HAVE_AVX512 0 /* portable C, vectorized by the compiler */
#endif
#if HAVE_AVX512 || defined(__AVX2__)
#include <immintrin.h> /* the vector code (AVX-512) and the streaming stores (both) */
#define HAVE_STREAM 1 /* streaming stores (the portable C's through put16: AVX2 machines) */
#else
#define HAVE_STREAM 0 /* regular stores only */
#endif

#define BN_ABI_VERSION 14
#define LANES 32                    /* independent float accumulators per reduction */
#define CHUNK_BYTES (16 << 10)      /* planes: statistics chunk, stays in L1 */
#ifndef BLOCK_BYTES
#define BLOCK_BYTES (128 << 10)     /* rows: statistics block, stays in L2 */
#endif
#define MAX_BLOCK_ROWS 256
#define MIN_WIDTH 128               /* rows: widen narrow rows to at least this many columns */
#define ROWS_MAX_B 32               /* planes shorter than this go to the rows path ... */
#define ROWS_MAX_ROW_BYTES (32 << 10) /* ... if a row of C*B values is at most this big */
#define ELEMS_PER_THREAD (32 << 10) /* fewer threads for small inputs */
#define VEC 16                      /* one AVX-512 vector: 16 values (64 B of f32, 32 B of bf16) */

enum { DT_F32 = 0, DT_BF16 = 1 };

#define INLINE static inline __attribute__((always_inline))

static int64_t cache_bytes = 32 << 20;
static int hugepages = 1;

int bn_abi_version(void) { return BN_ABI_VERSION; }

/* The last-level cache size: passes whose tensors exceed it use streaming stores (0: always, -1: never). */
void bn_set_cache_bytes(int64_t bytes) { cache_bytes = bytes; }

/* Whether large outputs are advised MADV_HUGEPAGE before their first write (default on). */
void bn_set_hugepages(int on) { hugepages = on; }

/* A freshly allocated output of many MB is first touched by our writes: with 4 KiB pages
 * the page faults cost more than the writes (about 20 ms for 100 MB here). Advising its
 * whole 2 MiB-aligned interior MADV_HUGEPAGE (Linux, transparent huge pages in `madvise`
 * mode) makes that ~3x cheaper. From HUGE_MIN_BYTES: glibc maps an allocation of that size
 * afresh whenever its heap cannot serve it, which in a training loop of varied tensor sizes is
 * often (raising this to 32 MiB, on the theory that smaller outputs always come back from the
 * heap already mapped, made NCHW (32,1024,14,14) training forward 4-7x slower in
 * `batchnorm bench`: 25.7 MB outputs page-faulting on 4 KiB pages). Pages already present are
 * unaffected; errors are ignored. */
#define HUGE_MIN_BYTES ((int64_t)8 << 20)
static void advise_huge(void *p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    if (!hugepages || p == NULL || bytes < HUGE_MIN_BYTES) return;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

/* ------------------------------------------------------------------ element access */

INLINE float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

INLINE uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    uint32_t u = v.u;
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(((u & 0x7FFFFFFFu) > 0x7F800000u) ? 0x7FC0u : rounded);
}

/* dt is a compile-time constant wherever these are inlined (see the dispatch below). */
INLINE float LD(const void *p, int64_t i, int dt) {
    return dt == DT_F32 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

INLINE void ST(void *p, int64_t i, float v, int dt) {
    if (dt == DT_F32)
        ((float *)p)[i] = v;
    else
        ((uint16_t *)p)[i] = f32_to_bf16(v);
}

INLINE int64_t elem_size(int dt) { return dt == DT_F32 ? 4 : 2; }

/* The apply pass for one value, xm = x - m: the one expression of the scalar code, so that BN +
 * ReLU's backward (gate1) tests what the forward (op1) computed, in the same operations. */
INLINE float affine1(float xm, float s, float h) { return xm * s + h; }

/* dy where the ReLU after BN passed it (gated, a constant where inlined): affine1 > 0 (NaN fails). */
INLINE float gate1(const int gated, float g, float xm, float gs, float gh) {
    return gated && !(affine1(xm, gs, gh) > 0.f) ? 0.f : g;
}

#if HAVE_AVX512
INLINE __m512 VLD(const void *p, int64_t i, int dt) {
    if (dt == DT_F32) return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 16 float32 -> 16 bfloat16, round to nearest even. With AVX512-BF16 one instruction
 * (vcvtneps2bf16), which also flushes denormal inputs and outputs (|v| < 2^-126) to zero
 * and keeps a NaN's sign and payload (quieted); otherwise integer arithmetic, NaN -> 0x7FC0,
 * exactly torch's conversion. */
INLINE __m256i to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
#endif
}

/* Non-temporal store of 16 values at p + i (64-byte aligned for f32, 32-byte for bf16). */
INLINE void VSTREAM(void *p, int64_t i, __m512 v, int dt) {
    if (dt == DT_F32) {
        _mm512_stream_ps((float *)p + i, v);
        return;
    }
    _mm256_stream_si256((__m256i *)((uint16_t *)p + i), to_bf16(v));
}

#ifndef STORE_PF
#define STORE_PF 2048 /* bytes ahead that prefetch_store asks for; 0: none */
#endif
/* Prefetch for writing (prefetchw) the line STORE_PF bytes past byte b of p, for the row loops'
 * regular stores. Their output is written a row at a time, and where it is not in L1/L2 every
 * line's read-for-ownership stalls the stores (perf: the store instruction took 18-27% of the
 * bfloat16 passes' samples); the hardware prefetchers follow the loads, not the stores.
 * kernel_ab.py, random order, two runs, bfloat16 channels_last / 2-D shapes in cache, against
 * none: train forward 0.88-0.97x the time, backward 0.89-1.01x, eval 0.92-1.03x; float32
 * channels_last (32,2048,7,7) 0.82-1.0x, the other float32 cases within 3% (their outputs
 * stream, or are out of the cache). 1024 and 4096 bytes measured the same as 2048. Not in the
 * NCHW plane loops: float32 eval and forward of (32,128,512) and (32,2048,7,7) took 1.08-1.14x
 * there (512-bit stores, whole lines). */
INLINE void prefetch_store(void *p, int64_t b) {
#if STORE_PF
    __builtin_prefetch((char *)p + b + STORE_PF, 1, 3);
#else
    (void)p, (void)b;
#endif
}

/* Regular (cached) store of 16 values at p + i. */
INLINE void VSTORE(void *p, int64_t i, __m512 v, int dt) {
    if (dt == DT_F32)
        _mm512_storeu_ps((float *)p + i, v);
    else
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), to_bf16(v));
}

/* Store of the lanes in k of v at p + i: only for partial vectors (masked stores are slow on
 * some cores, e.g. AMD Zen 4). */
INLINE void VSTORE_MASKED(void *p, int64_t i, __m512 v, __mmask16 k, int dt) {
    if (dt == DT_F32)
        _mm512_mask_storeu_ps((float *)p + i, k, v);
    else
        _mm256_mask_storeu_epi16((uint16_t *)p + i, k, to_bf16(v));
}
#endif

#define STREAM_N 16 /* the portable C's groups of values (group16, put16): streaming stores, bfloat16 on AVX2 */
#if !HAVE_AVX512 && HAVE_STREAM
/* 8 float32 lanes rounded to bfloat16 in the high halves of their 32-bit lanes (the low halves: carry
 * garbage): f32_to_bf16 (round to nearest even, NaN -> 0x7FC0) 8 lanes at once. GCC's vector code for
 * f32_to_bf16 takes 1.7x the instructions. */
INLINE __m256i bf16_round8_high(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}

/* The same in the low halves (the high halves 0). */
INLINE __m256i bf16_round8(__m256 f) { return _mm256_srli_epi32(bf16_round8_high(f), 16); }

/* The 16 bfloat16 values at p + i widened to float32 in v, in the order of the in-lane unpacks: elements
 * 0-3 and 8-11 in v[0:8], 4-7 and 12-15 in v[8:16]. bf16_unwiden16 packs them back in order, in-lane too:
 * no lane-crossing shuffle either way, but only for work that is the same in every lane. */
INLINE void bf16_widen16(const void *p, int64_t i, float *v) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)), z = _mm256_setzero_si256();
    _mm256_storeu_ps(v, _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, h)));
    _mm256_storeu_ps(v + 8, _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, h)));
}

INLINE __m256i bf16_unwiden16(const float *v) {
    return _mm256_packus_epi32(bf16_round8(_mm256_loadu_ps(v)), bf16_round8(_mm256_loadu_ps(v + 8)));
}

/* v[0:16] rounded to bfloat16, in order. */
INLINE __m256i bf16x16(const float *v) {
    return _mm256_permute4x64_epi64(bf16_unwiden16(v), 0xD8); /* packus packs within 128-bit halves */
}

/* 16 bfloat16 values to out + i: streaming stores (stream) or regular ones. */
INLINE void put_h16(void *out, int64_t i, __m256i h, const int stream) {
    __m256i *o = (__m256i *)((uint16_t *)out + i);
    if (stream)
        _mm256_stream_si256(o, h);
    else
        _mm256_storeu_si256(o, h);
}
#endif

#if !HAVE_AVX512
/* The portable C's store of v[0:16] to the output's elements [i, i+16); stream: with streaming stores,
 * i a multiple of 16 of an output aligned to 64 bytes (use_stream), 32 bytes at once (bfloat16's in
 * 16-byte stores took its dx pass 3x as long as regular stores). On AVX2 (this Zen 4 with
 * -mno-avx512f, kernel_ab.py), streaming: eval of (32,64,56,56) channels_last float32 1433 -> 1102 us
 * (the AVX-512 code's speed), NCHW float32 backward 2816 -> 2379. */
INLINE void put16(void *out, int64_t i, const float *v, const int stream, int dt) {
#if HAVE_STREAM
    if (dt != DT_F32) {
        put_h16(out, i, bf16x16(v), stream);
        return;
    }
    if (stream) {
        _mm256_stream_ps((float *)out + i, _mm256_loadu_ps(v));
        _mm256_stream_ps((float *)out + i + 8, _mm256_loadu_ps(v + 8));
        return;
    }
#else
    (void)stream;
#endif
    for (int k = 0; k < STREAM_N; k++) ST(out, i + k, v[k], dt);
}
#endif

/* Whether an output of `bytes` should be written with streaming stores: when the pass's working
 * set, `arrays` tensors of that size (its inputs and the output), does not fit in the last-level
 * cache. Then cached stores of the output would evict the inputs they are computed from and cost
 * a read-for-ownership each; below it, the output stays cached for its next reader. Measured
 * here (forward and eval, float32, 6-32 MB outputs): cached stores up to 30-45% faster up to
 * 12.8 MB, streaming 20-25% faster from 19 MB. A working set of exactly the cache's size (eval
 * of (4096, 1024) float32: x and y fill the 32 MiB) streams: random-order A/B, 4 processes,
 * 0.95-1.00x of torch with cached stores, 1.07-1.11x streaming; at 98% of it (4000, 1024)
 * cached stores were 3-6% faster while the cache was quiet and 6-12% slower while it was not. */
static int use_stream(const void *out, int64_t bytes, int arrays) {
    return HAVE_STREAM && out != NULL && ((uintptr_t)out & 63) == 0 && cache_bytes >= 0 &&
           bytes * arrays >= cache_bytes;
}

/* Thread t's share [lo, hi) of n items, as even as possible. */
INLINE void part(int64_t n, int t, int T, int64_t *lo, int64_t *hi) {
    int64_t q = n / T, r = n % T;
    *lo = t * q + (t < r ? t : r);
    *hi = *lo + q + (t < r ? 1 : 0);
}

/* Thread t's share of n elements, cut at multiples of 64 (whole cache lines of the output). */
INLINE void part_elems(int64_t n, int t, int T, int64_t *lo, int64_t *hi) {
    int64_t blocks = (n + 63) / 64, a, b;
    part(blocks, t, T, &a, &b);
    *lo = a * 64 < n ? a * 64 : n;
    *hi = b * 64 < n ? b * 64 : n;
}

static int threads_for(int64_t elems, int nthreads) {
    int64_t want = (elems + ELEMS_PER_THREAD - 1) / ELEMS_PER_THREAD;
    if (nthreads < 1) nthreads = 1;
    return want < nthreads ? (int)(want < 1 ? 1 : want) : nthreads;
}

/* Sum of the LANES partial sums, as a tree (vectorizes; a serial chain would not). */
INLINE float lanes_sum(float *acc) {
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0];
}

/* ------------------------------------------------------------------ planes */

/* One-pass statistics, bfloat16 only. Two passes (x - x0 summed, then its squared deviations
 * from that mean) cost twice the widening and arithmetic, and a bfloat16 statistics pass is
 * bound by them, not by memory; one pass sums d = x - x0 and d^2 together, M2 = S2 - S1^2 / n.
 * That cancels what the shift x0 misses of the mean: S2 / M2 = 1 + n (mean - x0)^2 / M2, and
 * M2 keeps about 24 - log2(S2 / M2) of float32's 24 bits. x0 is an estimate of the mean (the
 * first vector's mean in a plane, the earlier blocks' mean in rows), so that ratio is near 1;
 * where it exceeds ONE_PASS_CANCEL (more than 3 bits cancelled, still far more than bfloat16's
 * 8 bits) or is not a number, the two passes run instead. -DONE_PASS_BF16=0 always runs them.
 * (The portable C: seg_stats1_in, rows_block_stats1.) */
#ifndef ONE_PASS_BF16
#define ONE_PASS_BF16 1
#endif
#ifndef ONE_PASS_CANCEL
#define ONE_PASS_CANCEL 8.f
#endif
INLINE int one_pass(int dt) { return ONE_PASS_BF16 && dt == DT_BF16; }

#if HAVE_AVX512
/* Masked load of the first `n` (< 16) of 16 values; the other lanes are 0. */
INLINE __m512 VLDM(const void *p, int64_t i, __mmask16 k, int dt) {
    if (dt == DT_F32) return _mm512_maskz_loadu_ps(k, (const float *)p + i);
    __m256i h = _mm256_maskz_loadu_epi16(k, (const uint16_t *)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

INLINE __mmask16 first_lanes(int64_t n) { return (__mmask16)((1u << n) - 1u); }

/* Pass 1 of seg_stats over n >= 1 contiguous values: a0, a1 += x - x0 (the last partial vector masked). */
INLINE void seg_sum(const void *x, int64_t off, int64_t n, __m512 x0, int dt, __m512 *a0, __m512 *a1) {
    int64_t i = 0;
    for (; i + 2 * VEC <= n; i += 2 * VEC) {
        *a0 = _mm512_add_ps(*a0, _mm512_sub_ps(VLD(x, off + i, dt), x0));
        *a1 = _mm512_add_ps(*a1, _mm512_sub_ps(VLD(x, off + i + VEC, dt), x0));
    }
    if (i + VEC <= n) {
        *a0 = _mm512_add_ps(*a0, _mm512_sub_ps(VLD(x, off + i, dt), x0));
        i += VEC;
    }
    if (i < n) {
        const __mmask16 k = first_lanes(n - i);
        *a1 = _mm512_add_ps(*a1, _mm512_maskz_sub_ps(k, VLDM(x, off + i, k, dt), x0));
    }
}

/* Pass 2: a0, a1 += ((x - x0) - dm)^2. */
INLINE void seg_sq(const void *x, int64_t off, int64_t n, __m512 x0, __m512 dm, int dt, __m512 *a0, __m512 *a1) {
    int64_t i = 0;
    for (; i + 2 * VEC <= n; i += 2 * VEC) {
        __m512 d0 = _mm512_sub_ps(_mm512_sub_ps(VLD(x, off + i, dt), x0), dm);
        __m512 d1 = _mm512_sub_ps(_mm512_sub_ps(VLD(x, off + i + VEC, dt), x0), dm);
        *a0 = _mm512_fmadd_ps(d0, d0, *a0);
        *a1 = _mm512_fmadd_ps(d1, d1, *a1);
    }
    if (i + VEC <= n) {
        __m512 d0 = _mm512_sub_ps(_mm512_sub_ps(VLD(x, off + i, dt), x0), dm);
        *a0 = _mm512_fmadd_ps(d0, d0, *a0);
        i += VEC;
    }
    if (i < n) {
        const __mmask16 k = first_lanes(n - i);
        __m512 d1 = _mm512_maskz_sub_ps(k, _mm512_sub_ps(VLDM(x, off + i, k, dt), x0), dm);
        *a1 = _mm512_fmadd_ps(d1, d1, *a1);
    }
}

/* Mean and M2 of n >= 1 contiguous values x[off : off+n], by two passes (the chunk is in L1):
 * two vector accumulators, the last partial vector through a masked load. */
INLINE void seg_stats2(const void *x, int64_t off, int64_t n, int dt, double *mean, double *m2) {
    const float x0f = LD(x, off, dt);
    const __m512 x0 = _mm512_set1_ps(x0f);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    seg_sum(x, off, n, x0, dt, &a0, &a1);
    const float dmf = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) / (float)n; /* mean of x - x0 */
    a0 = a1 = _mm512_setzero_ps();
    seg_sq(x, off, n, x0, _mm512_set1_ps(dmf), dt, &a0, &a1);
    *mean = (double)x0f + (double)dmf;
    *m2 = (double)_mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* The lanes whose one-pass M2 (q2, from the sum of squares s2) may stand: S2 / M2 <= ONE_PASS_CANCEL. */
INLINE __mmask16 one_pass_ok(__m512 s2, __m512 q2) {
    return _mm512_cmp_ps_mask(s2, _mm512_mul_ps(_mm512_set1_ps(ONE_PASS_CANCEL), q2), _CMP_LE_OQ);
}

/* The one pass over n >= 1 contiguous values: *s = sum of x - x0, *q = sum of its squares, as vectors. */
INLINE void seg_sum_sq(const void *x, int64_t off, int64_t n, __m512 x0, int dt, __m512 *s, __m512 *q) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, q0 = a0, q1 = a0;
    int64_t i = 0;
    for (; i + 2 * VEC <= n; i += 2 * VEC) {
        const __m512 d0 = _mm512_sub_ps(VLD(x, off + i, dt), x0), d1 = _mm512_sub_ps(VLD(x, off + i + VEC, dt), x0);
        a0 = _mm512_add_ps(a0, d0);
        a1 = _mm512_add_ps(a1, d1);
        q0 = _mm512_fmadd_ps(d0, d0, q0);
        q1 = _mm512_fmadd_ps(d1, d1, q1);
    }
    if (i + VEC <= n) {
        const __m512 d0 = _mm512_sub_ps(VLD(x, off + i, dt), x0);
        a0 = _mm512_add_ps(a0, d0);
        q0 = _mm512_fmadd_ps(d0, d0, q0);
        i += VEC;
    }
    if (i < n) {
        const __mmask16 k = first_lanes(n - i);
        const __m512 d1 = _mm512_maskz_sub_ps(k, VLDM(x, off + i, k, dt), x0);
        a1 = _mm512_add_ps(a1, d1);
        q1 = _mm512_fmadd_ps(d1, d1, q1);
    }
    *s = _mm512_add_ps(a0, a1);
    *q = _mm512_add_ps(q0, q1);
}

/* The first min(n, 16) values of x[off ..], a vector (other lanes 0) for their mean: the shift. */
INLINE __m512 first_vector(const void *x, int64_t off, int64_t n, int dt) {
    return VLDM(x, off, first_lanes(n < VEC ? n : VEC), dt);
}

/* Mean and M2 of n >= 1 contiguous values x[off : off+n]: one pass where one_pass(dt) allows
 * it and it cancels little, else seg_stats2. */
INLINE void seg_stats(const void *x, int64_t off, int64_t n, int dt, double *mean, double *m2) {
    if (one_pass(dt)) {
        const float x0 = _mm512_reduce_add_ps(first_vector(x, off, n, dt)) / (float)(n < VEC ? n : VEC);
        __m512 s, q;
        seg_sum_sq(x, off, n, _mm512_set1_ps(x0), dt, &s, &q);
        const double s1 = (double)_mm512_reduce_add_ps(s), s2 = (double)_mm512_reduce_add_ps(q);
        const double dm = s1 / (double)n, q2 = s2 - s1 * dm;
        if (s2 <= ONE_PASS_CANCEL * q2) {
            *mean = (double)x0 + dm;
            *m2 = q2;
            return;
        }
    }
    seg_stats2(x, off, n, dt, mean, m2);
}

/* Lane j = the sum of v[j]'s 16 lanes, for j < 16: four levels of shuffles and adds (30
 * instructions for 16 horizontal sums, against about 8 each one at a time), then the 4x4
 * transpose of lanes those levels leave. */
INLINE __m512 reduce16(const __m512 *v) {
    __m512 u[8], w[4], z[2];
    for (int i = 0; i < 8; i++) /* 512 -> 256 bits: v[2i] in lanes 0-7, v[2i+1] in 8-15 */
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++) /* 256 -> 128 */
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++) /* 128 -> 64, within 128-bit lanes */
        z[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

/* 16 float32 lanes to 16 doubles at out. */
INLINE void store16_pd(double *out, __m512 v) {
    _mm512_storeu_pd(out, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    _mm512_storeu_pd(out + 8, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

/* seg_stats of the 16 whole planes p0 .. p0+15 of B values each (their data in L1 after the
 * first pass), into r1/r2[p0 ..]: the same two passes per plane, the horizontal sums 16 at a
 * time. For 7x7 planes one reduction per plane and pass was most of the statistics' time. */
INLINE void planes16_stats(const void *x, int64_t p0, int64_t B, int dt, double *r1, double *r2) {
    __m512 v[16];
    float x0a[16];
    if (one_pass(dt)) { /* as seg_stats, 16 planes at a time */
        __m512 q[16];
        for (int j = 0; j < 16; j++) v[j] = first_vector(x, (p0 + j) * B, B, dt);
        const __m512 x0 = _mm512_div_ps(reduce16(v), _mm512_set1_ps((float)(B < VEC ? B : VEC)));
        for (int j = 0; j < 16; j++)
            seg_sum_sq(x, (p0 + j) * B, B, _mm512_permutexvar_ps(_mm512_set1_epi32(j), x0), dt, &v[j], &q[j]);
        const __m512 s1 = reduce16(v), s2 = reduce16(q), dm = _mm512_div_ps(s1, _mm512_set1_ps((float)B));
        const __m512 q2 = _mm512_fnmadd_ps(s1, dm, s2);
        double mx[16], md[16];
        store16_pd(mx, x0);
        store16_pd(md, dm);
        for (int j = 0; j < 16; j++) r1[p0 + j] = mx[j] + md[j];
        store16_pd(r2 + p0, q2);
        const __mmask16 ok = one_pass_ok(s2, q2);
        for (int j = 0; j < 16; j++)
            if (!((ok >> j) & 1)) seg_stats2(x, (p0 + j) * B, B, dt, &r1[p0 + j], &r2[p0 + j]);
        return;
    }
    for (int j = 0; j < 16; j++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        x0a[j] = LD(x, (p0 + j) * B, dt);
        seg_sum(x, (p0 + j) * B, B, _mm512_set1_ps(x0a[j]), dt, &a0, &a1);
        v[j] = _mm512_add_ps(a0, a1);
    }
    const __m512 dm = _mm512_div_ps(reduce16(v), _mm512_set1_ps((float)B)); /* mean of x - x0, per plane */
    for (int j = 0; j < 16; j++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        seg_sq(x, (p0 + j) * B, B, _mm512_set1_ps(x0a[j]), _mm512_permutexvar_ps(_mm512_set1_epi32(j), dm), dt,
               &a0, &a1);
        v[j] = _mm512_add_ps(a0, a1);
    }
    const __m512 x0 = _mm512_loadu_ps(x0a);
    double mx[16], md[16];
    store16_pd(mx, x0);
    store16_pd(md, dm);
    for (int j = 0; j < 16; j++) r1[p0 + j] = mx[j] + md[j]; /* as seg_stats: x0 + dm in double */
    store16_pd(r2 + p0, reduce16(v));
}

/* dy where the ReLU after BN passed it: (x - m) * gs + gh > 0 with xm = x - m, the forward's apply
 * pass before relu, in the same float32 operations (bitwise its test). NaN fails the test. */
INLINE __m512 gatev(__m512 g, __m512 xm, __m512 gs, __m512 gh) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_fmadd_ps(xm, gs, gh), _mm512_setzero_ps(), _CMP_GT_OQ), g);
}

/* sum(dy) and sum(dy * (x - m)) over n contiguous values at off, as vectors (masked lanes load dy = 0);
 * gated (a constant where inlined): dy through gatev first (BN + ReLU). */
INLINE void seg_grad_acc(const void *dy, const void *x, int64_t off, int64_t n, __m512 m, const int gated,
                         __m512 gs, __m512 gh, int dt, __m512 *s1, __m512 *s2) {
    __m512 a1 = _mm512_setzero_ps(), b1 = a1, a2 = a1, b2 = a1;
    int64_t i = 0;
    for (; i + 2 * VEC <= n; i += 2 * VEC) {
        __m512 g0 = VLD(dy, off + i, dt), g1 = VLD(dy, off + i + VEC, dt);
        const __m512 xm0 = _mm512_sub_ps(VLD(x, off + i, dt), m), xm1 = _mm512_sub_ps(VLD(x, off + i + VEC, dt), m);
        if (gated) {
            g0 = gatev(g0, xm0, gs, gh);
            g1 = gatev(g1, xm1, gs, gh);
        }
        a1 = _mm512_add_ps(a1, g0);
        b1 = _mm512_add_ps(b1, g1);
        a2 = _mm512_fmadd_ps(g0, xm0, a2);
        b2 = _mm512_fmadd_ps(g1, xm1, b2);
    }
    for (; i < n; i += VEC) {
        __mmask16 k = n - i >= VEC ? (__mmask16)0xFFFF : first_lanes(n - i);
        __m512 g = VLDM(dy, off + i, k, dt);
        const __m512 xm = _mm512_sub_ps(VLDM(x, off + i, k, dt), m);
        if (gated) g = gatev(g, xm, gs, gh);
        a1 = _mm512_add_ps(a1, g);
        a2 = _mm512_fmadd_ps(g, xm, a2);
    }
    *s1 = _mm512_add_ps(a1, b1);
    *s2 = _mm512_add_ps(a2, b2);
}

/* sum(dy) and sum(dy * (x - mu)) over n contiguous values at off (gated: as seg_grad_acc). */
INLINE void seg_grad_sums(const void *dy, const void *x, int64_t off, int64_t n, float mu, const int gated, float gs,
                          float gh, int dt, double *s1, double *s2) {
    __m512 v1, v2;
    seg_grad_acc(dy, x, off, n, _mm512_set1_ps(mu), gated, _mm512_set1_ps(gs), _mm512_set1_ps(gh), dt, &v1, &v2);
    *s1 = (double)_mm512_reduce_add_ps(v1);
    *s2 = (double)_mm512_reduce_add_ps(v2);
}

/* seg_grad_sums of the 16 whole planes p0 .. p0+15 (channel of plane p: p % C), into
 * r1/r2[p0 ..], the horizontal sums 16 at a time (see planes16_stats). */
INLINE void planes16_grad(const void *dy, const void *x, const float *mu, const int gated, const float *gs,
                          const float *gh, int64_t p0, int64_t C, int64_t B, int dt, double *r1, double *r2) {
    __m512 v1[16], v2[16];
    for (int64_t j = 0, c = p0 % C; j < 16; j++) {
        const __m512 vs = gated ? _mm512_set1_ps(gs[c]) : _mm512_setzero_ps();
        const __m512 vh = gated ? _mm512_set1_ps(gh[c]) : vs;
        seg_grad_acc(dy, x, (p0 + j) * B, B, _mm512_set1_ps(mu[c]), gated, vs, vh, dt, &v1[j], &v2[j]);
        if (++c == C) c = 0;
    }
    store16_pd(r1 + p0, reduce16(v1));
    store16_pd(r2 + p0, reduce16(v2));
}
#else
/* Segments shorter than SHORT_SEG (short planes: 7x7, 14x14) go through SHORT_NV vectors of 8
 * lanes, not LANES lanes: fewer lanes to sum at the end, one register on AVX2. Each lane sums its
 * values in a fixed order, whatever the compiler makes of the loops: the ReLU backward's gated
 * sums stay bitwise the plain ones (with `#pragma omp simd reduction` they did not). Before, the
 * last partial group went lane by lane with a bound check, unvectorized. On AVX2 (kernel_ab.py,
 * -mno-avx512f): (32,2048,7,7) float32 training forward 2950 -> 1014 us, backward 2745 -> 1382;
 * (32,1024,14,14) forward 2631 -> 1841 (torch's AVX2 kernels: 3356, 2831, 6729). */
#define SHORT_SEG (8 * LANES)
#define SHORT_NV 1
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi" /* v8f is never passed across a call: every user is inlined */
#endif
typedef float v8f __attribute__((vector_size(32))); /* 8 float lanes: a ymm register, two on SSE or NEON */

INLINE v8f v8_load(const void *x, int64_t i, int dt) {
    v8f v;
    for (int k = 0; k < 8; k++) v[k] = LD(x, i + k, dt);
    return v;
}

/* a * b + c (lane by lane), rounded once where the machine has a fused multiply-add (as the AVX-512
 * code's _mm512_fmadd_ps) and twice where it has none. Written out, not left to the compiler's
 * contraction, which differed between two inlined copies of one loop: the ReLU backward's gated
 * sums then differed from the plain ones in the last bit. */
INLINE float madd(float a, float b, float c) {
#ifdef __FP_FAST_FMAF
    return fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

INLINE v8f v8_madd(v8f a, v8f b, v8f c) {
    v8f r;
    for (int k = 0; k < 8; k++) r[k] = madd(a[k], b[k], c[k]);
    return r;
}

/* The sum of nv vectors' lanes, halving as lanes_sum does. */
INLINE float v8_sum(v8f *a, const int nv) {
    for (int w = nv / 2; w > 0; w /= 2)
        for (int v = 0; v < w; v++) a[v] += a[v + w];
    const v8f h = {a[0][4], a[0][5], a[0][6], a[0][7]};
    const v8f q = a[0] + h;
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* Mean and M2 of n >= 1 contiguous values x[off : off+n], by two passes (the chunk is in L1), in
 * nv vectors of 8 lanes (a constant where inlined) and the last n % (8 nv) values one by one. */
INLINE void seg_stats_in(const void *x, int64_t off, int64_t n, int dt, const int nv, double *mean, double *m2) {
    const float x0 = LD(x, off, dt);
    const int64_t n0 = n - n % (8 * nv);
    v8f acc[LANES / 8];
    float t = 0.f;
    for (int v = 0; v < nv; v++) acc[v] = (v8f){0};
    for (int64_t i = 0; i < n0; i += 8 * nv)
        for (int v = 0; v < nv; v++) acc[v] += v8_load(x, off + i + 8 * v, dt) - x0;
    for (int64_t i = n0; i < n; i++) t += LD(x, off + i, dt) - x0;
    const float dm = (v8_sum(acc, nv) + t) / (float)n; /* mean of x - x0 */

    t = 0.f;
    for (int v = 0; v < nv; v++) acc[v] = (v8f){0};
    for (int64_t i = 0; i < n0; i += 8 * nv)
        for (int v = 0; v < nv; v++) {
            const v8f d = (v8_load(x, off + i + 8 * v, dt) - x0) - dm;
            acc[v] = v8_madd(d, d, acc[v]);
        }
    for (int64_t i = n0; i < n; i++) {
        const float d = (LD(x, off + i, dt) - x0) - dm;
        t = madd(d, d, t);
    }
    *mean = (double)x0 + (double)dm;
    *m2 = (double)(v8_sum(acc, nv) + t);
}

/* The same in one pass about x0, the mean of the first min(n, 8) values (S2 / M2 <= 1 + n / 8), where
 * one_pass (as the AVX-512 code's seg_stats): 0 where that cancels more than ONE_PASS_CANCEL allows.
 * Training forward, kernel_ab.py on AVX2: (32,1024,14,14) NCHW 1287 -> 1055 us, (32,2048,7,7) 864 ->
 * 781 (torch 1445, 813). With x0 from 16 values added one by one, a serial chain, 7x7 planes lost:
 * 1224 -> 1370. */
INLINE int seg_stats1_in(const void *x, int64_t off, int64_t n, int dt, const int nv, double *mean, double *m2) {
    const int64_t n0 = n - n % (8 * nv);
    float x0 = 0.f, t = 0.f, tq = 0.f;
    if (n >= 8) { /* one vector's sum: no serial chain of adds */
        v8f f = v8_load(x, off, dt);
        x0 = v8_sum(&f, 1) / 8.f;
    } else {
        for (int64_t i = 0; i < n; i++) x0 += LD(x, off + i, dt);
        x0 /= (float)n;
    }
    v8f a[LANES / 8], q[LANES / 8];
    for (int v = 0; v < nv; v++) a[v] = q[v] = (v8f){0};
    for (int64_t i = 0; i < n0; i += 8 * nv)
        for (int v = 0; v < nv; v++) {
            const v8f d = v8_load(x, off + i + 8 * v, dt) - x0;
            a[v] += d;
            q[v] = v8_madd(d, d, q[v]);
        }
    for (int64_t i = n0; i < n; i++) {
        const float d = LD(x, off + i, dt) - x0;
        t += d;
        tq = madd(d, d, tq);
    }
    const double s1 = (double)(v8_sum(a, nv) + t), s2 = (double)(v8_sum(q, nv) + tq);
    const double dm = s1 / (double)n, q2 = s2 - s1 * dm;
    if (!(s2 <= ONE_PASS_CANCEL * q2)) return 0;
    *mean = (double)x0 + dm;
    *m2 = q2;
    return 1;
}

/* nv a constant in each call, so that the loops over it unroll (as a variable: 1.7x the time) */
INLINE void seg_stats_nv(const void *x, int64_t off, int64_t n, int dt, const int nv, double *mean, double *m2) {
    if (!(one_pass(dt) && seg_stats1_in(x, off, n, dt, nv, mean, m2))) seg_stats_in(x, off, n, dt, nv, mean, m2);
}

INLINE void seg_stats(const void *x, int64_t off, int64_t n, int dt, double *mean, double *m2) {
    if (n < SHORT_SEG)
        seg_stats_nv(x, off, n, dt, SHORT_NV, mean, m2);
    else
        seg_stats_nv(x, off, n, dt, LANES / 8, mean, m2);
}

/* sum(dy) and sum(dy * (x - mu)) over n contiguous values at off (gated: dy through gate1), in nv
 * vectors as seg_stats_in. */
INLINE void seg_grad_in(const void *dy, const void *x, int64_t off, int64_t n, float mu, const int gated, float gs,
                        float gh, int dt, const int nv, double *s1, double *s2) {
    const int64_t n0 = n - n % (8 * nv);
    v8f a1[LANES / 8], a2[LANES / 8];
    float t1 = 0.f, t2 = 0.f;
    for (int v = 0; v < nv; v++) a1[v] = a2[v] = (v8f){0};
    for (int64_t i = 0; i < n0; i += 8 * nv)
        for (int v = 0; v < nv; v++) {
            const v8f xm = v8_load(x, off + i + 8 * v, dt) - mu, g0 = v8_load(dy, off + i + 8 * v, dt);
            v8f g;
            for (int k = 0; k < 8; k++) g[k] = gate1(gated, g0[k], xm[k], gs, gh);
            a1[v] += g;
            a2[v] = v8_madd(g, xm, a2[v]);
        }
    for (int64_t i = n0; i < n; i++) {
        const float xm = LD(x, off + i, dt) - mu, g = gate1(gated, LD(dy, off + i, dt), xm, gs, gh);
        t1 += g;
        t2 = madd(g, xm, t2);
    }
    *s1 = (double)(v8_sum(a1, nv) + t1);
    *s2 = (double)(v8_sum(a2, nv) + t2);
}

INLINE void seg_grad_sums(const void *dy, const void *x, int64_t off, int64_t n, float mu, const int gated, float gs,
                          float gh, int dt, double *s1, double *s2) {
    if (n < SHORT_SEG)
        seg_grad_in(dy, x, off, n, mu, gated, gs, gh, dt, SHORT_NV, s1, s2);
    else
        seg_grad_in(dy, x, off, n, mu, gated, gs, gh, dt, LANES / 8, s1, s2);
}

#endif

/* Chunking of a plane of B values: nch chunks of L values (the last one shorter, never empty). */
INLINE void plane_chunks(int64_t B, int dt, int64_t *nch, int64_t *L) {
    int64_t ch = CHUNK_BYTES / elem_size(dt);
    *nch = (B + ch - 1) / ch;
    *L = (B + *nch - 1) / *nch;
}

/* Units [lo, hi); unit u = ((a * C) + c) * nch + k: chunk k of plane (a, c). Results go to
 * r1/r2[(a * nch + k) * C + c] so that the per-channel merge reads along c.
 * grad = 0: (mean, M2) of x; grad = 1: (sum dy, sum dy * (x - mu[c])); grad = 2: the same with
 * dy gated by the ReLU of the apply pass (x - mu[c]) * gs[c] + gh[c] (BN + ReLU's backward). */
INLINE void planes_units_range(const void *x, const void *dy, const float *mu, const float *gs, const float *gh,
                               int64_t C, int64_t B, const int grad, int dt, double *r1, double *r2, int64_t lo,
                               int64_t hi) {
    const int gated = grad == 2;
    int64_t nch, L;
    plane_chunks(B, dt, &nch, &L);
    if (lo >= hi) return;
#if HAVE_AVX512
    if (nch == 1) { /* whole planes: unit = plane = slot; 16 at a time */
        int64_t p = lo;
        for (; p + 16 <= hi; p += 16)
            if (grad)
                planes16_grad(dy, x, mu, gated, gs, gh, p, C, B, dt, r1, r2);
            else
                planes16_stats(x, p, B, dt, r1, r2);
        for (; p < hi; p++)
            if (grad)
                seg_grad_sums(dy, x, p * B, B, mu[p % C], gated, gated ? gs[p % C] : 0.f, gated ? gh[p % C] : 0.f, dt,
                              &r1[p], &r2[p]);
            else
                seg_stats(x, p * B, B, dt, &r1[p], &r2[p]);
        return;
    }
#endif
    int64_t p = lo / nch, k = lo % nch, c = p % C, a = p / C; /* advanced without division */
    for (int64_t u = lo; u < hi; u++) {
        int64_t start = k * L, n = (B - start) < L ? (B - start) : L;
        int64_t slot = (a * nch + k) * C + c;
        if (grad)
            seg_grad_sums(dy, x, p * B + start, n, mu[c], gated, gated ? gs[c] : 0.f, gated ? gh[c] : 0.f, dt,
                          &r1[slot], &r2[slot]);
        else
            seg_stats(x, p * B + start, n, dt, &r1[slot], &r2[slot]);
        if (++k == nch) {
            k = 0;
            p++;
            if (++c == C) {
                c = 0;
                a++;
            }
        }
    }
}

/* planes_units_range over thread t's share of all A * C * nch units. */
INLINE void planes_units(const void *x, const void *dy, const float *mu, const float *gs, const float *gh, int64_t A,
                         int64_t C, int64_t B, const int grad, int dt, double *r1, double *r2, int t, int T) {
    int64_t nch, L, lo, hi;
    plane_chunks(B, dt, &nch, &L);
    part(A * C * nch, t, T, &lo, &hi);
    planes_units_range(x, dy, mu, gs, gh, C, B, grad, dt, r1, r2, lo, hi);
}

/* Chan-merge the chunk statistics of channels [c0, c1) in order a = 0.., k = 0..
 * Within one (a, k) every channel has the same count, so the weights are scalars. cnt: NULL, or
 * the count of each chunk a * nch + k (masks; chunks of count 0 are skipped, and channels
 * without any value get mean 0 and M2 0). */
static void planes_merge_stats(const double *r1, const double *r2, const double *cnt, int64_t A, int64_t C,
                               int64_t B, int64_t nch, int64_t L, int64_t c0, int64_t c1, double *mean,
                               double *m2) {
    double na = 0.0;
    for (int64_t c = c0; c < c1 && cnt; c++) mean[c] = m2[c] = 0.0;
    for (int64_t a = 0; a < A; a++)
        for (int64_t k = 0; k < nch; k++) {
            double nb = cnt ? cnt[a * nch + k] : (double)((B - k * L) < L ? (B - k * L) : L), n = na + nb;
            if (nb == 0.0) continue;
            const double *mb = r1 + (a * nch + k) * C, *qb = r2 + (a * nch + k) * C;
            if (na == 0.0) {
                for (int64_t c = c0; c < c1; c++) {
                    mean[c] = mb[c];
                    m2[c] = qb[c];
                }
            } else {
                double f1 = nb / n, f2 = na * nb / n;
                for (int64_t c = c0; c < c1; c++) {
                    double d = mb[c] - mean[c];
                    mean[c] += d * f1;
                    m2[c] += qb[c] + d * d * f2;
                }
            }
            na = n;
        }
}

/* The elementwise passes, one expression each:
 *   APPLY:    out = (x - m) * s + h                  (training forward, inference with m = 0)
 *   RELU:     out = relu((x - m) * s + h)            (BN + ReLU)
 *   ADD_RELU: out = relu((x - m) * s + h + r)        (BN + residual add + ReLU; r read through dy)
 *   DX:       out = k * dy + b * (x - m) + h         (training backward)
 *   DX_RELU:  DX with dy where (x - m) * gs + gh > 0 (BN + ReLU's backward, the mask recomputed)
 * The APPLY family differs only after the affine step (`act`), in float32, rounded once to the
 * output's dtype. relu keeps NaN (as torch.relu) and sends -0 and below to 0 (max(0, v)). */
enum { OP_APPLY = 0, OP_DX = 1, OP_RELU = 2, OP_ADD_RELU = 3, OP_DX_RELU = 4 };

/* DX and DX_RELU (BN + ReLU's backward: DX with dy gated by the forward's ReLU, recomputed from x
 * and the apply pass's coefficients gs, gh; see gatev) take the b coefficient. */
INLINE int is_dx(int op) { return op == OP_DX || op == OP_DX_RELU; }

INLINE float act1(int op, float v, const void *r, int64_t i, int dt) {
    if (op == OP_ADD_RELU) v += LD(r, i, dt);
    return (op == OP_RELU || op == OP_ADD_RELU) && v <= 0.f ? 0.f : v;
}

INLINE float op1_g(int op, const void *x, const void *dy, int64_t i, float m, float s, float b, float h, float gs,
                   float gh, int dt) {
    const float xm = LD(x, i, dt) - m;
    if (is_dx(op)) return s * gate1(op == OP_DX_RELU, LD(dy, i, dt), xm, gs, gh) + b * xm + h;
    return act1(op, affine1(xm, s, h), dy, i, dt);
}

INLINE float op1(int op, const void *x, const void *dy, int64_t i, float m, float s, float b, float h, int dt) {
    return op1_g(op, x, dy, i, m, s, b, h, s, h, dt);
}

#if HAVE_AVX512
/* `act1` on 16 values; rv: r's 16 values (read only for ADD_RELU). max_ps returns its second
 * operand where either is NaN, so max(0, v) keeps a NaN v. */
INLINE __m512 actv(int op, __m512 v, __m512 rv) {
    if (op == OP_ADD_RELU) v = _mm512_add_ps(v, rv);
    return op == OP_RELU || op == OP_ADD_RELU ? _mm512_max_ps(_mm512_setzero_ps(), v) : v;
}

/* One op on 16 values at i; gs, gh: DX_RELU's gate (unused by the other ops). */
INLINE __m512 opv_g(int op, const void *x, const void *dy, int64_t i, __m512 m, __m512 s, __m512 b, __m512 h,
                    __m512 gs, __m512 gh, int dt) {
    const __m512 xm = _mm512_sub_ps(VLD(x, i, dt), m);
    if (op == OP_DX_RELU) return _mm512_fmadd_ps(s, gatev(VLD(dy, i, dt), xm, gs, gh), _mm512_fmadd_ps(b, xm, h));
    if (op == OP_DX) return _mm512_fmadd_ps(s, VLD(dy, i, dt), _mm512_fmadd_ps(b, xm, h));
    return actv(op, _mm512_fmadd_ps(xm, s, h), op == OP_ADD_RELU ? VLD(dy, i, dt) : xm);
}

INLINE __m512 opv(int op, const void *x, const void *dy, int64_t i, __m512 m, __m512 s, __m512 b, __m512 h,
                  int dt) {
    return opv_g(op, x, dy, i, m, s, b, h, s, h, dt);
}

/* opv_g on the lanes in k (a partial vector: the other lanes are 0 and not stored). */
INLINE __m512 opv_masked(int op, const void *x, const void *dy, int64_t i, __mmask16 k, __m512 m, __m512 s,
                         __m512 b, __m512 h, __m512 gs, __m512 gh, int dt) {
    const __m512 xm = _mm512_maskz_sub_ps(k, VLDM(x, i, k, dt), m);
    if (op == OP_DX_RELU) return _mm512_fmadd_ps(s, gatev(VLDM(dy, i, k, dt), xm, gs, gh), _mm512_fmadd_ps(b, xm, h));
    if (op == OP_DX) return _mm512_fmadd_ps(s, VLDM(dy, i, k, dt), _mm512_fmadd_ps(b, xm, h));
    return actv(op, _mm512_fmadd_ps(xm, s, h), op == OP_ADD_RELU ? VLDM(dy, i, k, dt) : xm);
}
#endif

#define PLANE_LOOP_MAX 4096 /* longest planes for planes_elementwise_cached (threads split whole planes) */
#if HAVE_AVX512
/* The elementwise pass with regular stores for planes of 16 <= B <= PLANE_LOOP_MAX values
 * (longer planes gain nothing, and a thread's share must not hang on few long planes: one
 * (1, 3, 224, 224) image would split 2:1): plane by plane, whole
 * vectors, and the plane's last vector ending at its end, overlapping the one before (the
 * overlap is written twice with the same values): no masks and no per-vector bookkeeping.
 * For 7x7 planes the straddling loop below spent most of its instructions on the latter
 * (perf annotate: loop control, not arithmetic). Threads take whole planes. */
INLINE void planes_elementwise_cached(int op, const void *x, const void *dy, void *out, int64_t C, int64_t B,
                                      const float *m, const float *s, const float *b, const float *h,
                                      const float *gs, const float *gh, int dt, int64_t lo, int64_t hi) {
    for (int64_t p = lo, c = lo % C; p < hi; p++) {
        const __m512 vm = _mm512_set1_ps(m[c]), vs = _mm512_set1_ps(s[c]), vh = _mm512_set1_ps(h[c]);
        const __m512 vb = is_dx(op) ? _mm512_set1_ps(b[c]) : vs;
        const __m512 ggs = op == OP_DX_RELU ? _mm512_set1_ps(gs[c]) : vs;
        const __m512 ggh = op == OP_DX_RELU ? _mm512_set1_ps(gh[c]) : vh;
        const int64_t o = p * B, last = o + B - VEC;
        for (int64_t i = o; i < last; i += VEC) VSTORE(out, i, opv_g(op, x, dy, i, vm, vs, vb, vh, ggs, ggh, dt), dt);
        VSTORE(out, last, opv_g(op, x, dy, last, vm, vs, vb, vh, ggs, ggh, dt), dt);
        if (++c == C) c = 0;
    }
}

/* The elementwise pass over the elements [lo, hi) of the planes of B values, in whole
 * aligned vectors of 16 that may straddle planes: where a plane starts inside a vector, the
 * lanes from there on take the next plane's coefficients (masked blend). So short planes
 * (7x7) cost no scalar heads and tails, and a cache line is never written half by streaming
 * and half by regular stores: lo is a multiple of 64 elements (hi too, but at the tensor's
 * end, which can be a partial vector: masked store). */
INLINE void planes_elementwise_straddling(int op, const void *x, const void *dy, void *out, int64_t C, int64_t B,
                                          const float *m, const float *s, const float *b, const float *h,
                                          const float *gs, const float *gh, int stream, int dt, int64_t lo,
                                          int64_t hi) {
    const int gated = op == OP_DX_RELU;
    if (lo >= hi) return;
    int64_t p = lo / B, c = p % C, pend = (p + 1) * B;
    __m512 vm = _mm512_set1_ps(m[c]), vs = _mm512_set1_ps(s[c]), vh = _mm512_set1_ps(h[c]);
    __m512 vb = is_dx(op) ? _mm512_set1_ps(b[c]) : vs;
    __m512 vgs = gated ? _mm512_set1_ps(gs[c]) : vs, vgh = gated ? _mm512_set1_ps(gh[c]) : vh;
    for (int64_t i = lo; i < hi;) {
        /* whole vectors inside the current plane: no checks */
        const int64_t run = i + ((pend < hi ? pend : hi) - i) / VEC * VEC;
        if (stream) {
#pragma GCC unroll 4
            for (; i < run; i += VEC) VSTREAM(out, i, opv_g(op, x, dy, i, vm, vs, vb, vh, vgs, vgh, dt), dt);
        } else {
#pragma GCC unroll 4
            for (; i < run; i += VEC) VSTORE(out, i, opv_g(op, x, dy, i, vm, vs, vb, vh, vgs, vgh, dt), dt);
        }
        if (i >= hi) break;
        /* the vector holding the next plane start(s), or the tensor's partial last vector */
        __m512 cm = vm, cs = vs, cb = vb, ch = vh, cgs = vgs, cgh = vgh;
        while (pend < i + VEC && pend < hi) { /* a plane starts at lane pend - i */
            if (++c == C) c = 0;
            const __mmask16 next = (__mmask16)~((1u << (pend - i)) - 1u);
            vm = _mm512_set1_ps(m[c]);
            vs = _mm512_set1_ps(s[c]);
            vh = _mm512_set1_ps(h[c]);
            vb = is_dx(op) ? _mm512_set1_ps(b[c]) : vs;
            cm = _mm512_mask_mov_ps(cm, next, vm);
            cs = _mm512_mask_mov_ps(cs, next, vs);
            cb = _mm512_mask_mov_ps(cb, next, vb);
            ch = _mm512_mask_mov_ps(ch, next, vh);
            if (gated) {
                vgs = _mm512_set1_ps(gs[c]);
                vgh = _mm512_set1_ps(gh[c]);
                cgs = _mm512_mask_mov_ps(cgs, next, vgs);
                cgh = _mm512_mask_mov_ps(cgh, next, vgh);
            }
            pend += B;
        }
        if (i + VEC <= hi) {
            const __m512 v = opv_g(op, x, dy, i, cm, cs, cb, ch, cgs, cgh, dt);
            if (stream)
                VSTREAM(out, i, v, dt);
            else
                VSTORE(out, i, v, dt);
        } else {
            const __mmask16 k = first_lanes(hi - i);
            VSTORE_MASKED(out, i, opv_masked(op, x, dy, i, k, cm, cs, cb, ch, cgs, cgh, dt), k, dt);
        }
        i += VEC;
    }
}

#else
/* op1_g on the 16 values from element i (one channel's coefficients) to out + i; stream: with streaming
 * stores (i a multiple of 16, the output aligned to 64 bytes). bfloat16 on AVX2 goes through float32
 * copies of its inputs made by bf16_widen16, on which op1_g runs as on float32 tensors. kernel_ab.py
 * on AVX2 (-mno-avx512f), with planes_elementwise_cached: eval of (32,2048,7,7) bfloat16 NCHW 392 ->
 * 307 us, (8,3,224,224) 116 -> 79, backward of (32,1024,14,14) 1627 -> 1457 (torch's AVX2 kernels 373,
 * 101, 2853); widened in order (two vpmovzxwd, and a permute back) 446 and 120 against in-lane's 378, 110. */
INLINE void group16(int op, const void *x, const void *dy, void *out, int64_t i, float m, float s, float b, float h,
                    float gs, float gh, const int stream, int dt) {
    float v[STREAM_N];
#if HAVE_STREAM
    if (dt != DT_F32) {
        float xv[STREAM_N], dv[STREAM_N];
        bf16_widen16(x, i, xv);
        if (op != OP_APPLY && op != OP_RELU) bf16_widen16(dy, i, dv);
#pragma omp simd
        for (int k = 0; k < STREAM_N; k++) v[k] = op1_g(op, xv, dv, k, m, s, b, h, gs, gh, DT_F32);
        put_h16(out, i, bf16_unwiden16(v), stream);
        return;
    }
#endif
#pragma omp simd
    for (int k = 0; k < STREAM_N; k++) v[k] = op1_g(op, x, dy, i + k, m, s, b, h, gs, gh, dt);
    put16(out, i, v, stream, dt);
}

/* out[i:end] = op(...) with one channel's coefficients (portable variant); stream: the whole
 * groups of STREAM_N with streaming stores, if i is a multiple of STREAM_N (the callers' ranges
 * start on planes whose length is, or on multiples of 64). bfloat16 on AVX2 goes in groups with
 * either kind of store. */
INLINE void span(int op, const void *x, const void *dy, void *out, int64_t i, int64_t end, float m, float s,
                 float b, float h, float gs, float gh, int stream, int dt) {
    if (stream ? i % STREAM_N == 0 : HAVE_STREAM && dt != DT_F32)
        for (; i + STREAM_N <= end; i += STREAM_N) group16(op, x, dy, out, i, m, s, b, h, gs, gh, stream, dt);
#pragma omp simd
    for (int64_t j = i; j < end; j++) ST(out, j, op1_g(op, x, dy, j, m, s, b, h, gs, gh, dt), dt);
}

/* The elementwise pass over the elements [lo, hi) of the planes of B values, plane by plane (lo a multiple
 * of 64 or of B). */
INLINE void planes_elementwise_straddling(int op, const void *x, const void *dy, void *out, int64_t C, int64_t B,
                                          const float *m, const float *s, const float *b, const float *h,
                                          const float *gs, const float *gh, int stream, int dt, int64_t lo,
                                          int64_t hi) {
    if (lo >= hi) return;
    /* Streaming stores only where every plane starts on a group: the groups that straddle planes
     * would mix regular and streaming stores in one cache line, which took (32,2048,7,7) float32's
     * dx pass 2.5x as long as regular stores alone. */
    stream = stream && B % STREAM_N == 0;
    int64_t p = lo / B, c = p % C;
    for (int64_t i = lo; i < hi; p++) {
        int64_t end = (p + 1) * B < hi ? (p + 1) * B : hi;
        const int gated = op == OP_DX_RELU;
        span(op, x, dy, out, i, end, m[c], s[c], is_dx(op) ? b[c] : 0.f, h[c], gated ? gs[c] : 0.f,
             gated ? gh[c] : 0.f, stream, dt);
        i = end;
        if (++c == C) c = 0;
    }
}

/* The elementwise pass with regular stores for planes of 16 <= B <= PLANE_LOOP_MAX values, as the
 * AVX-512 code's: plane by plane, groups of 16, the last one ending at the plane's end and
 * overlapping the one before (written twice, with the same values). The compiler's loop over a
 * plane had a scalar tail and its set-up per plane (alone: eval of (32,2048,7,7) bfloat16 406 -> 377 us,
 * training forward of (32,1024,14,14) 2034 -> 1826). */
INLINE void planes_elementwise_cached(int op, const void *x, const void *dy, void *out, int64_t C, int64_t B,
                                      const float *m, const float *s, const float *b, const float *h,
                                      const float *gs, const float *gh, int dt, int64_t lo, int64_t hi) {
    const int gated = op == OP_DX_RELU;
    for (int64_t p = lo, c = lo % C; p < hi; p++) {
        const float mc = m[c], sc = s[c], bc = is_dx(op) ? b[c] : 0.f, hc = h[c];
        const float gsc = gated ? gs[c] : 0.f, ghc = gated ? gh[c] : 0.f;
        const int64_t o = p * B, last = o + B - STREAM_N;
        for (int64_t i = o; i < last; i += STREAM_N) group16(op, x, dy, out, i, mc, sc, bc, hc, gsc, ghc, 0, dt);
        group16(op, x, dy, out, last, mc, sc, bc, hc, gsc, ghc, 0, dt);
        if (++c == C) c = 0;
    }
}

#endif

INLINE int plane_loop(int stream, int64_t B) { return !stream && B >= VEC && B <= PLANE_LOOP_MAX; }

/* The elementwise pass over this thread's share of the P planes of B values: whole planes each
 * (planes_elementwise_cached) where plane_loop, else elements cut at multiples of 64. */
INLINE void planes_elementwise(int op, const void *x, const void *dy, void *out, int64_t P, int64_t C,
                               int64_t B, const float *m, const float *s, const float *b, const float *h,
                               const float *gs, const float *gh, int stream, int dt, int t, int T) {
    int64_t lo, hi;
    if (plane_loop(stream, B)) {
        part(P, t, T, &lo, &hi);
        planes_elementwise_cached(op, x, dy, out, C, B, m, s, b, h, gs, gh, dt, lo, hi);
    } else {
        part_elems(P * B, t, T, &lo, &hi);
        planes_elementwise_straddling(op, x, dy, out, C, B, m, s, b, h, gs, gh, stream, dt, lo, hi);
    }
}

/* The elementwise pass over the whole planes [p0, p1) on one thread (p0 * B a multiple of 64). */
INLINE void planes_elementwise_run(int op, const void *x, const void *dy, void *out, int64_t C, int64_t B,
                                   const float *m, const float *s, const float *b, const float *h, const float *gs,
                                   const float *gh, int stream, int dt, int64_t p0, int64_t p1) {
    if (plane_loop(stream, B))
        planes_elementwise_cached(op, x, dy, out, C, B, m, s, b, h, gs, gh, dt, p0, p1);
    else
        planes_elementwise_straddling(op, x, dy, out, C, B, m, s, b, h, gs, gh, stream, dt, p0 * B, p1 * B);
}

/* ------------------------------------------------------------------ rows */

/* The (A, C*B) matrix widened: k original rows -> one row of W = k*C*B columns, column j of
 * channel (j / B) % C; Ms = A / k wide rows, then `tail` = A % k original rows of Wc columns. */
typedef struct {
    int64_t A, C, B, Wc, k, W, Ms, tail;
} rows_shape;

static rows_shape rows_layout(int64_t A, int64_t C, int64_t B) {
    rows_shape s;
    int64_t Wc = C * B, k = 1;
    if (Wc < MIN_WIDTH) {
        int64_t g = Wc, h = VEC; /* k: W a multiple of VEC, and >= MIN_WIDTH */
        while (h) { int64_t r = g % h; g = h; h = r; }
        k = VEC / g;
        while (k * Wc < MIN_WIDTH) k += VEC / g;
        if (k > A) k = 1; /* too few rows to widen */
    }
    s.A = A; s.C = C; s.B = B; s.Wc = Wc; s.k = k; s.W = k * Wc; s.Ms = A / k; s.tail = A - (A / k) * k;
    return s;
}

static int use_rows(int64_t A, int64_t C, int64_t B, int dt) {
    (void)A;
    return B == 1 || (B < ROWS_MAX_B && C * B * elem_size(dt) <= ROWS_MAX_ROW_BYTES);
}

INLINE int64_t rows_block(int64_t W, int dt) {
    int64_t R = BLOCK_BYTES / (W * elem_size(dt));
    return R < 1 ? 1 : (R > MAX_BLOCK_ROWS ? MAX_BLOCK_ROWS : R);
}

INLINE int64_t pad16(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* The rows loops take one row after the other (per-column vectors are reloaded from L1 for
 * every row): interleaving 4 short rows halved the streaming rate, and pairing long rows
 * gained nothing measurable while adding compile time. The exception: bfloat16 rows whose
 * coefficients overflow half of L1 go four at a time (rows_wide, rows_apply_pairs). */

#if HAVE_AVX512
#define TILE 8 /* vectors per column tile: 8 accumulators (+ 8 shifts, 8 means) stay in registers */
#define PREFETCH_ROWS 4 /* rows ahead that the rows reductions prefetch (pf) */

/* How the rows reductions prefetch (rows_pf): 1 where their `arrays` inputs fit in the last-level
 * cache, else 2. A column tile walks a block's rows a row's stride apart and takes only its 128
 * columns of each (256 bytes of bfloat16), too little work per row to hide the L3's latency;
 * the hardware's prefetchers do not follow that walk from the L3 (hence 1). From memory, the
 * tile's columns prefetched measured slower than none, but whole rows in address order faster. */
INLINE int rows_prefetch(rows_shape s, int dt, int arrays) {
    return s.A * s.C * s.B * elem_size(dt) * arrays <= cache_bytes ? 1 : 2;
}

/* Prefetch n values at p + i into L1, a cache line at a time (never faults, even past the end). */
INLINE void prefetch_span(const void *p, int64_t i, int64_t n, int dt) {
    const char *c = (const char *)p + i * elem_size(dt);
    for (int64_t b = 0; b < n * elem_size(dt); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

#ifndef ROW_PF
#define ROW_PF 4 /* rows ahead that a block's first column tile prefetches whole (pf 2); 0: none */
#endif

/* The rows reductions' prefetch at row offset o of a tile at column j (nv vectors wide):
 * pf 1 (inputs in the cache): the tile's columns PREFETCH_ROWS rows ahead, into L1;
 * pf 2 (inputs from memory; the block's first tile of several): the whole row ROW_PF rows ahead,
 * into L2, in address order. From memory a tile's walk (a few lines of each row, a row apart)
 * streams poorly; the whole rows arrive as one stream, and the block's other tiles find them in
 * L2 (a block is BLOCK_BYTES). */
INLINE void rows_pf(const void *p, const int pf, int64_t o, int64_t j, int64_t W, int nv, int dt) {
    if (pf == 1) {
        prefetch_span(p, o + PREFETCH_ROWS * W, VEC * nv, dt);
    } else if (pf == 2) {
        const char *c = (const char *)p + (o - j + ROW_PF * W) * elem_size(dt);
        for (int64_t b = 0; b < W * elem_size(dt); b += 64) _mm_prefetch(c + b, _MM_HINT_T1);
    }
}

/* The prefetch mode of the tile at column j of a block (pf: rows_prefetch's): 2 only for the
 * first of several tiles of a row. */
INLINE int tile_pf(int pf, int64_t j, int64_t W, int nv) {
    return pf == 2 ? (ROW_PF && j == 0 && W > VEC * nv ? 2 : 0) : pf;
}

/* Columns [j, j + 16*nv) of the block's nr rows at base (row length W): x0 = the block's first
 * row, sm = mean of x - x0, q = sum of squared deviations from it; two passes, both with the
 * accumulators in registers. masked (one vector, lanes `last`) for the end of a row. x0, sm, q
 * have room for whole vectors. nv and masked are constants where this is inlined. */
INLINE void rows_tile_stats(const void *x, int dt, int64_t base, int64_t W, int64_t nr, int64_t j, const int nv,
                            const int masked, __mmask16 last, const int pf, float *x0, float *sm, float *q) {
    __m512 z[TILE], a[TILE];
    for (int v = 0; v < nv; v++) {
        z[v] = masked ? VLDM(x, base + j, last, dt) : VLD(x, base + j + VEC * v, dt);
        a[v] = _mm512_setzero_ps();
    }
    for (int64_t r = 1; r < nr; r++) {
        const int64_t o = base + r * W + j;
        rows_pf(x, pf, o, j, W, nv, dt);
        for (int v = 0; v < nv; v++)
            a[v] = _mm512_add_ps(a[v], _mm512_sub_ps(masked ? VLDM(x, o, last, dt) : VLD(x, o + VEC * v, dt), z[v]));
    }
    const __m512 inv = _mm512_set1_ps(1.f / (float)nr);
    for (int v = 0; v < nv; v++) a[v] = _mm512_mul_ps(a[v], inv);
    __m512 acc[TILE];
    for (int v = 0; v < nv; v++) acc[v] = _mm512_setzero_ps();
    for (int64_t r = 0; r < nr; r++) {
        const int64_t o = base + r * W + j;
        for (int v = 0; v < nv; v++) {
            const __m512 d = _mm512_sub_ps(_mm512_sub_ps(masked ? VLDM(x, o, last, dt) : VLD(x, o + VEC * v, dt), z[v]),
                                           a[v]);
            acc[v] = _mm512_fmadd_ps(d, d, acc[v]);
        }
    }
    for (int v = 0; v < nv; v++) {
        _mm512_storeu_ps(x0 + j + VEC * v, z[v]);
        _mm512_storeu_ps(sm + j + VEC * v, a[v]);
        _mm512_storeu_ps(q + j + VEC * v, acc[v]);
    }
}

/* rows_tile_stats in one pass (see seg_sum_sq) about the shift already in x0 (the mean of the
 * earlier blocks): sm, q as there. Returns 0, leaving the tile to the two passes, where some
 * column cancels more than ONE_PASS_CANCEL allows. */
INLINE int rows_tile_stats1(const void *x, int dt, int64_t base, int64_t W, int64_t nr, int64_t j, const int nv,
                            const int masked, __mmask16 last, const int pf, const float *x0, float *sm, float *q) {
    __m512 z[TILE], a[TILE], b[TILE];
    for (int v = 0; v < nv; v++) {
        z[v] = masked ? _mm512_maskz_loadu_ps(last, x0 + j) : _mm512_loadu_ps(x0 + j + VEC * v);
        a[v] = b[v] = _mm512_setzero_ps();
    }
    for (int64_t r = 0; r < nr; r++) {
        const int64_t o = base + r * W + j;
        rows_pf(x, pf, o, j, W, nv, dt);
        for (int v = 0; v < nv; v++) {
            const __m512 d = _mm512_sub_ps(masked ? VLDM(x, o, last, dt) : VLD(x, o + VEC * v, dt), z[v]);
            a[v] = _mm512_add_ps(a[v], d);
            b[v] = _mm512_fmadd_ps(d, d, b[v]);
        }
    }
    const __m512 inv = _mm512_set1_ps(1.f / (float)nr);
    __mmask16 ok = 0xFFFF;
    for (int v = 0; v < nv; v++) {
        const __m512 m = _mm512_mul_ps(a[v], inv), q2 = _mm512_fnmadd_ps(a[v], m, b[v]);
        ok &= one_pass_ok(b[v], q2);
        _mm512_storeu_ps(sm + j + VEC * v, m);
        _mm512_storeu_ps(q + j + VEC * v, q2);
    }
    return ok == 0xFFFF;
}

/* One tile's statistics; shifted: in one pass about the x0 given (rows_tile_stats1) where that
 * cancels little, else in two about the block's first row (rows_tile_stats). */
INLINE void rows_tile_stats_any(const void *x, int dt, int64_t base, int64_t W, int64_t nr, int64_t j, const int nv,
                                const int masked, __mmask16 last, const int shifted, const int pf, float *x0, float *sm,
                                float *q) {
    if (!(shifted && rows_tile_stats1(x, dt, base, W, nr, j, nv, masked, last, pf, x0, sm, q)))
        rows_tile_stats(x, dt, base, W, nr, j, nv, masked, last, pf, x0, sm, q);
}

/* One block's per-column (x0, mean of x - x0, M2), tile by tile (shifted, pf: as rows_tile_stats_any). */
INLINE void rows_block_stats(const void *x, int dt, int64_t base, int64_t W, int64_t nr, const int shifted,
                             const int pf, float *x0, float *sm, float *q) {
    int64_t j = 0;
    for (; j + TILE * VEC <= W; j += TILE * VEC)
        rows_tile_stats_any(x, dt, base, W, nr, j, TILE, 0, 0, shifted, tile_pf(pf, j, W, TILE), x0, sm, q);
    for (; j + VEC <= W; j += VEC)
        rows_tile_stats_any(x, dt, base, W, nr, j, 1, 0, 0, shifted, tile_pf(pf, j, W, 1), x0, sm, q);
    if (j < W)
        rows_tile_stats_any(x, dt, base, W, nr, j, 1, 1, first_lanes(W - j), shifted, tile_pf(pf, j, W, 1), x0, sm,
                            q);
}
#endif

#if !HAVE_AVX512
/* A block's per-column x0 (its first row), mean of x - x0 and M2, in two passes. */
INLINE void rows_block_stats2(const void *x, int dt, int64_t base, int64_t W, int64_t nr, float *x0, float *sm,
                              float *q) {
    int64_t r;
    for (int64_t j = 0; j < W; j++) {
        x0[j] = LD(x, base + j, dt);
        sm[j] = 0.f;
        q[j] = 0.f;
    }
    /* pass 1: sum of x - x0 (row 0 adds nothing) */
    for (r = 1; r < nr; r++)
#pragma omp simd
        for (int64_t j = 0; j < W; j++) sm[j] += LD(x, base + r * W + j, dt) - x0[j];
    const float inv = 1.f / (float)nr;
    for (int64_t j = 0; j < W; j++) sm[j] *= inv; /* block mean of x - x0 */
    /* pass 2 (from cache): sum of squared deviations from the block mean */
    for (r = 0; r < nr; r++)
#pragma omp simd
        for (int64_t j = 0; j < W; j++) {
            float d = (LD(x, base + r * W + j, dt) - x0[j]) - sm[j];
            q[j] += d * d;
        }
}

/* The same in one pass about the shift already in x0 (the mean of the earlier blocks), where
 * one_pass: 0 where some column cancels more than ONE_PASS_CANCEL allows (see one_pass). Training
 * forward, kernel_ab.py on AVX2 (-mno-avx512f), two passes -> one: (32,512,28,28) channels_last
 * 2949 -> 2528 us, (32,1024,14,14) 1268 -> 1069, (4096,1024) 801 -> 672 (torch's AVX2 kernels 2845,
 * 1361, 929). */
INLINE int rows_block_stats1(const void *x, int dt, int64_t base, int64_t W, int64_t nr, const float *x0, float *sm,
                             float *q) {
    for (int64_t j = 0; j < W; j++) sm[j] = q[j] = 0.f;
    for (int64_t r = 0; r < nr; r++) {
#pragma omp simd
        for (int64_t j = 0; j < W; j++) {
            const float d = LD(x, base + r * W + j, dt) - x0[j];
            sm[j] += d;
            q[j] += d * d;
        }
    }
    const float inv = 1.f / (float)nr;
    int ok = 1;
#pragma omp simd reduction(& : ok)
    for (int64_t j = 0; j < W; j++) {
        const float m = sm[j] * inv, q2 = q[j] - sm[j] * m;
        ok &= q[j] <= ONE_PASS_CANCEL * q2;
        sm[j] = m;
        q[j] = q2;
    }
    return ok;
}
#endif

/* Thread t: statistics of its wide rows, block by block (two passes per block), Chan-merged
 * into per-column accumulators amean/am2 (count *an, the same for every column). */
INLINE void rows_stats_thread(const void *x, rows_shape s, int dt, float *x0, float *sm, float *q,
                              double *amean, double *am2, double *an, int t, int T) {
    int64_t lo, hi, W = s.W, R = rows_block(W, dt);
    part(s.Ms, t, T, &lo, &hi);
    double na = 0.0;
#if HAVE_AVX512
    const int pf = rows_prefetch(s, dt, 1);
#endif
    for (int64_t r0 = lo; r0 < hi; r0 += R) {
        int64_t nr = hi - r0 < R ? hi - r0 : R, base = r0 * W;
#if HAVE_AVX512
        rows_block_stats(x, dt, base, W, nr, one_pass(dt) && r0 > lo, pf, x0, sm, q);
#else
        if (!(one_pass(dt) && r0 > lo && rows_block_stats1(x, dt, base, W, nr, x0, sm, q)))
            rows_block_stats2(x, dt, base, W, nr, x0, sm, q);
#endif
        double nb = (double)nr, n = na + nb;
        if (na == 0.0) {
            for (int64_t j = 0; j < W; j++) {
                amean[j] = (double)x0[j] + (double)sm[j];
                am2[j] = (double)q[j];
            }
        } else {
            double f1 = nb / n, f2 = na * nb / n;
#pragma omp simd
            for (int64_t j = 0; j < W; j++) {
                double d = ((double)x0[j] + (double)sm[j]) - amean[j];
                amean[j] += d * f1;
                am2[j] += (double)q[j] + d * d * f2;
            }
        }
        na = n;
        if (one_pass(dt)) /* the next block's shift: the mean so far */
            for (int64_t j = 0; j < W; j++) x0[j] = (float)amean[j];
    }
    *an = na;
}

#if HAVE_AVX512
/* Columns [j, j + 16*nv) of the block's nr rows at base: sum(dy) and sum(dy * (x - mu)) in
 * registers, then added in float64 to a1, a2. As rows_tile_stats for nv, masked, last; gated
 * (a constant): dy through gatev with the per-column gsw, ghw, kept in registers for nv <= TILE / 2
 * and read from L1 for wider tiles (registers run out). The gated sums take GATED_NV vectors a
 * tile, like the plain ones: with 4 (64 columns: 128 bytes of a bfloat16 row; the rule until session 18)
 * the relu backward's sums took 1.3-1.6x the plain ones' time on rows of 1024-2048 channels;
 * with 8, kernel_ab.py bwd_relu, Zen 4, whole backward: (4096,1024) bfloat16 996-1560 -> 928-1327 us
 * (six runs), (32,2048,7,7) float32 channels_last 1253-1406 -> 1143-1364 (three),
 * (32,256,56,56) bfloat16 channels_last 7816, 8742 -> 7313, 8274. */
#ifndef GATED_NV
#define GATED_NV TILE
#endif
INLINE void rows_tile_grad(const void *dy, const void *x, const float *muw, const int gated, const float *gsw,
                           const float *ghw, int dt, int64_t base, int64_t W, int64_t nr, int64_t j, const int nv,
                           const int masked, __mmask16 last, const int pf, double *a1, double *a2) {
    const int gate_in_regs = gated && nv <= TILE / 2;
    __m512 mu[TILE], g1[TILE], g2[TILE], gs[TILE], gh[TILE];
    for (int v = 0; v < nv; v++) {
        mu[v] = _mm512_loadu_ps(muw + j + VEC * v); /* more scratch follows muw: whole vectors stay inside */
        gs[v] = gh[v] = mu[v];
        if (gate_in_regs) {
            gs[v] = masked ? _mm512_maskz_loadu_ps(last, gsw + j) : _mm512_loadu_ps(gsw + j + VEC * v);
            gh[v] = masked ? _mm512_maskz_loadu_ps(last, ghw + j) : _mm512_loadu_ps(ghw + j + VEC * v);
        }
        g1[v] = g2[v] = _mm512_setzero_ps();
    }
    for (int64_t r = 0; r < nr; r++) {
        const int64_t o = base + r * W + j;
        rows_pf(x, pf, o, j, W, nv, dt);
        rows_pf(dy, pf, o, j, W, nv, dt);
        for (int v = 0; v < nv; v++) {
            __m512 g = masked ? VLDM(dy, o, last, dt) : VLD(dy, o + VEC * v, dt);
            const __m512 xm = _mm512_sub_ps(masked ? VLDM(x, o, last, dt) : VLD(x, o + VEC * v, dt), mu[v]);
            if (gate_in_regs)
                g = gatev(g, xm, gs[v], gh[v]);
            else if (gated)
                g = gatev(g, xm, _mm512_loadu_ps(gsw + j + VEC * v), _mm512_loadu_ps(ghw + j + VEC * v));
            g1[v] = _mm512_add_ps(g1[v], g);
            g2[v] = _mm512_fmadd_ps(g, xm, g2[v]);
        }
    }
    float f1[TILE * VEC], f2[TILE * VEC];
    for (int v = 0; v < nv; v++) {
        _mm512_storeu_ps(f1 + VEC * v, g1[v]);
        _mm512_storeu_ps(f2 + VEC * v, g2[v]);
    }
    const int64_t n = masked ? (W - j < VEC ? W - j : VEC) : VEC * nv;
    for (int64_t i = 0; i < n; i++) {
        a1[j + i] += (double)f1[i];
        a2[j + i] += (double)f2[i];
    }
}
#endif

/* Thread t: sum(dy) and sum(dy * (x - mu)) per column of its wide rows; float within a
 * block, float64 across blocks. gsw NULL, or dy gated by the ReLU of the apply pass with the
 * per-column gsw, ghw (BN + ReLU's backward). */
INLINE void rows_grad_thread(const void *dy, const void *x, rows_shape s, const float *muw, const float *gsw,
                             const float *ghw, int dt, float *b1, float *b2, double *a1, double *a2, int t, int T) {
    int64_t lo, hi, W = s.W, R = rows_block(W, dt);
    part(s.Ms, t, T, &lo, &hi);
    for (int64_t j = 0; j < W; j++) a1[j] = a2[j] = 0.0;
#if HAVE_AVX512
    const int pf = rows_prefetch(s, dt, 2);
#endif
    for (int64_t r0 = lo; r0 < hi; r0 += R) {
        int64_t nr = hi - r0 < R ? hi - r0 : R, base = r0 * W;
#if HAVE_AVX512
        (void)b1;
        (void)b2;
        int64_t j = 0;
        if (gsw) {
            const int nv = GATED_NV;
            for (; j + nv * VEC <= W; j += nv * VEC)
                rows_tile_grad(dy, x, muw, 1, gsw, ghw, dt, base, W, nr, j, nv, 0, 0, tile_pf(pf, j, W, nv), a1, a2);
            for (; j + VEC <= W; j += VEC)
                rows_tile_grad(dy, x, muw, 1, gsw, ghw, dt, base, W, nr, j, 1, 0, 0, tile_pf(pf, j, W, 1), a1, a2);
            if (j < W)
                rows_tile_grad(dy, x, muw, 1, gsw, ghw, dt, base, W, nr, j, 1, 1, first_lanes(W - j),
                               tile_pf(pf, j, W, 1), a1, a2);
            continue;
        }
        for (; j + TILE * VEC <= W; j += TILE * VEC)
            rows_tile_grad(dy, x, muw, 0, NULL, NULL, dt, base, W, nr, j, TILE, 0, 0, tile_pf(pf, j, W, TILE), a1, a2);
        for (; j + VEC <= W; j += VEC)
            rows_tile_grad(dy, x, muw, 0, NULL, NULL, dt, base, W, nr, j, 1, 0, 0, tile_pf(pf, j, W, 1), a1, a2);
        if (j < W)
            rows_tile_grad(dy, x, muw, 0, NULL, NULL, dt, base, W, nr, j, 1, 1, first_lanes(W - j),
                           tile_pf(pf, j, W, 1), a1, a2);
#else
        int64_t r;
        for (int64_t j = 0; j < W; j++) b1[j] = b2[j] = 0.f;
        for (r = 0; r < nr; r++)
#pragma omp simd
            for (int64_t j = 0; j < W; j++) {
                const float xm = LD(x, base + r * W + j, dt) - muw[j];
                const float g = gate1(gsw != NULL, LD(dy, base + r * W + j, dt), xm, gsw ? gsw[j] : 0.f,
                                      gsw ? ghw[j] : 0.f);
                b1[j] += g;
                b2[j] += g * xm;
            }
#pragma omp simd
        for (int64_t j = 0; j < W; j++) {
            a1[j] += (double)b1[j];
            a2[j] += (double)b2[j];
        }
#endif
    }
}

#ifndef WIDE_ROWS
#define WIDE_ROWS 4 /* rows per load of the coefficients in bfloat16 rows_wide and pairs (1: row by row) */
#endif
#ifndef WIDE_MIN_BYTES
#define WIDE_MIN_BYTES 16384 /* ... where a row's coefficients (8 to 24 bytes a column) exceed this */
#endif
#if HAVE_AVX512
/* rows_wide's bfloat16 pass on nrows (a constant where inlined) whole rows from element o0: the
 * coefficients of each 16 columns loaded once for all of them; the last vector of a row masked. */
INLINE void wide_rows_bf16(int op, const void *x, const void *dy, void *y, int64_t W, int64_t o0, const int nrows,
                           const float *mw, const float *sw, const float *bw, const float *hw, const float *gsw,
                           const float *ghw, const int st) {
    const __mmask16 last = first_lanes(W % VEC);
    const __m512 zero = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + VEC <= W; j += VEC) {
        const __m512 m = mw ? _mm512_loadu_ps(mw + j) : zero, sc = _mm512_loadu_ps(sw + j);
        const __m512 b = is_dx(op) ? _mm512_loadu_ps(bw + j) : sc, h = _mm512_loadu_ps(hw + j);
        const __m512 gs = op == OP_DX_RELU ? _mm512_loadu_ps(gsw + j) : sc;
        const __m512 gh = op == OP_DX_RELU ? _mm512_loadu_ps(ghw + j) : sc;
        for (int k = 0; k < nrows; k++) {
            const int64_t o = o0 + k * W;
            const __m512 v = opv_g(op, x, dy, o + j, m, sc, b, h, gs, gh, DT_BF16);
            if (st)
                VSTREAM(y, o + j, v, DT_BF16);
            else {
                prefetch_store(y, (o + j) * 2);
                VSTORE(y, o + j, v, DT_BF16);
            }
        }
    }
    if (j < W) {
        const __m512 m = mw ? _mm512_maskz_loadu_ps(last, mw + j) : zero, sc = _mm512_maskz_loadu_ps(last, sw + j);
        const __m512 b = is_dx(op) ? _mm512_maskz_loadu_ps(last, bw + j) : sc;
        const __m512 h = _mm512_maskz_loadu_ps(last, hw + j);
        const __m512 gs = op == OP_DX_RELU ? _mm512_maskz_loadu_ps(last, gsw + j) : sc;
        const __m512 gh = op == OP_DX_RELU ? _mm512_maskz_loadu_ps(last, ghw + j) : sc;
        for (int k = 0; k < nrows; k++) {
            const int64_t o = o0 + k * W;
            VSTORE_MASKED(y, o + j, opv_masked(op, x, dy, o + j, last, m, sc, b, h, gs, gh, DT_BF16), last, DT_BF16);
        }
    }
}

/* The elementwise pass (APPLY: float32 and bfloat16; DX: bfloat16) on rows [lo, hi) wider than a
 * tile, row by row, each vector 32 bytes of memory: 8 float32 in a 256-bit register, or 16 bfloat16
 * widened to a 512-bit one; the last vector of a row masked; mw NULL: no centre (inference). For
 * rows of 1024-2048 channels (channels_last, 2-D), random-order A/B on Zen 4 against the 512-bit
 * tiles below: float32 APPLY 10-30% faster in inference (also faster than a 512-bit float32 row
 * loop) and up to 15% in the training forward; bfloat16 APPLY 10-35% faster in inference, the
 * training forward within noise (its statistics pass dominates); bfloat16 DX 0-18% faster. The
 * float32 DX gained nothing (within noise, either width) and keeps the tiles. st (a constant where
 * inlined): streaming stores, which need W % 16 == 0.
 * The bfloat16 passes read two to six float32 coefficient vectors per 16 values (DX: four, 256
 * bytes against 96 of data). Where a row's coefficients no longer fit in half of L1 (DX from 1025
 * columns, 683 gated; the training APPLY from 1366) they come from L2, so the pass takes WIDE_ROWS
 * rows at once and loads them once per 16 columns of all four. kernel_ab.py, Zen 4: bwd (whole
 * backward), in cache: (32,2048,7,7) channels_last 631-690 -> 548-579 us, (1024,4096) 907-1041
 * -> 686-834, (1568,2048) 671 -> 556, (3072,1280) 1310 -> 1224; from memory, streaming stores:
 * (32,2048,14,14) channels_last 5792-6371 -> 4317-4392. train (statistics and APPLY):
 * (32,2048,7,7) channels_last 428-555 -> 367-518, (1568,2048) 381, 453 -> 345, 408, (512,8192)
 * 777, 871 -> 616, 706, (32,2048,14,14) channels_last 2989 -> 2377. Below the rule DX loses:
 * (4096,1024) 666-826 -> 711-915, (32,512,28,28) channels_last 3180 -> 4041. Bitwise the
 * row-by-row result. */
INLINE void rows_wide(int op, const void *x, const void *dy, void *y, int64_t W, int64_t lo, int64_t hi,
                      const float *mw, const float *sw, const float *bw, const float *hw, const float *gsw,
                      const float *ghw, const int st, int dt) {
    if (dt == DT_F32) { /* the APPLY family only (dy: the residual of ADD_RELU) */
        const __mmask8 last = (__mmask8)((1u << (W % 8)) - 1u);
        const int relu = op == OP_RELU || op == OP_ADD_RELU;
        for (int64_t r = lo; r < hi; r++) {
            const float *xr = (const float *)x + r * W, *rr = (const float *)dy + r * W;
            float *yr = (float *)y + r * W;
            int64_t j = 0;
            for (; j + 8 <= W; j += 8) {
                __m256 xv = _mm256_loadu_ps(xr + j);
                if (mw) xv = _mm256_sub_ps(xv, _mm256_loadu_ps(mw + j));
                __m256 v = _mm256_fmadd_ps(xv, _mm256_loadu_ps(sw + j), _mm256_loadu_ps(hw + j));
                if (op == OP_ADD_RELU) v = _mm256_add_ps(v, _mm256_loadu_ps(rr + j));
                if (relu) v = _mm256_max_ps(_mm256_setzero_ps(), v);
                if (st)
                    _mm256_stream_ps(yr + j, v);
                else {
                    if ((j & 8) == 0) prefetch_store(yr, j * 4); /* once per line */
                    _mm256_storeu_ps(yr + j, v);
                }
            }
            if (j < W) {
                __m256 xv = _mm256_maskz_loadu_ps(last, xr + j);
                if (mw) xv = _mm256_sub_ps(xv, _mm256_maskz_loadu_ps(last, mw + j));
                __m256 v =
                    _mm256_fmadd_ps(xv, _mm256_maskz_loadu_ps(last, sw + j), _mm256_maskz_loadu_ps(last, hw + j));
                if (op == OP_ADD_RELU) v = _mm256_add_ps(v, _mm256_maskz_loadu_ps(last, rr + j));
                if (relu) v = _mm256_max_ps(_mm256_setzero_ps(), v);
                _mm256_mask_storeu_ps(yr + j, last, v);
            }
        }
        return;
    }
    int64_t r = lo;
#if WIDE_ROWS > 1
    const int64_t coef_bytes = 4 * ((mw != NULL) + 2 + is_dx(op) + 2 * (op == OP_DX_RELU));
    if (W * coef_bytes > WIDE_MIN_BYTES)
        for (; r + WIDE_ROWS <= hi; r += WIDE_ROWS)
            wide_rows_bf16(op, x, dy, y, W, r * W, WIDE_ROWS, mw, sw, bw, hw, gsw, ghw, st);
#endif
    for (; r < hi; r++) wide_rows_bf16(op, x, dy, y, W, r * W, 1, mw, sw, bw, hw, gsw, ghw, st);
}

#ifndef APPLY_ROWS
#define APPLY_ROWS 16 /* rows per block of the elementwise passes, for rows wider than one tile */
#endif

/* Columns [j, j + 16*nv) of rows [r0, r1): the tile's per-column coefficients are loaded once,
 * into registers, so the loop does one load of x (two with dy) and one store per vector instead
 * of also reloading three or four coefficient vectors from L1 for every row. */
INLINE void rows_tile_apply(int op, const void *x, const void *dy, void *out, int64_t W, int64_t r0, int64_t r1,
                            int64_t j, const int nv, const float *mw, const float *sw, const float *bw,
                            const float *hw, const float *gsw, const float *ghw, const int st, const int pf,
                            int dt) {
    __m512 m[TILE], sc[TILE], b[TILE], h[TILE], gs[TILE], gh[TILE];
    for (int v = 0; v < nv; v++) {
        m[v] = mw ? _mm512_loadu_ps(mw + j + VEC * v) : _mm512_setzero_ps();
        sc[v] = _mm512_loadu_ps(sw + j + VEC * v);
        b[v] = is_dx(op) ? _mm512_loadu_ps(bw + j + VEC * v) : sc[v];
        h[v] = _mm512_loadu_ps(hw + j + VEC * v);
        gs[v] = op == OP_DX_RELU ? _mm512_loadu_ps(gsw + j + VEC * v) : sc[v];
        gh[v] = op == OP_DX_RELU ? _mm512_loadu_ps(ghw + j + VEC * v) : h[v];
    }
    for (int64_t r = r0; r < r1; r++) {
        const int64_t o = r * W + j;
        if (pf) {
            rows_pf(x, 2, o, j, W, nv, dt);
            if (is_dx(op) || op == OP_ADD_RELU) rows_pf(dy, 2, o, j, W, nv, dt);
        }
        for (int v = 0; v < nv; v++) {
            const __m512 y = opv_g(op, x, dy, o + VEC * v, m[v], sc[v], b[v], h[v], gs[v], gh[v], dt);
            if (st)
                VSTREAM(out, o + VEC * v, y, dt);
            else
                VSTORE(out, o + VEC * v, y, dt);
        }
    }
}

/* Rows [lo, hi) of width W: column tiles of 128 columns (apply), 64 (dx, which keeps four
 * coefficient vectors per column) or 32 (DX_RELU: six), over blocks of APPLY_ROWS rows (all rows
 * at once when one tile spans the row); the last vector of a row masked when W % 16 != 0. st (a
 * constant where inlined): streaming stores, which need W % 16 == 0. */
INLINE void rows_avx512(int op, const void *x, const void *dy, void *out, int64_t W, int64_t lo, int64_t hi,
                        const float *mw, const float *sw, const float *bw, const float *hw, const float *gsw,
                        const float *ghw, const int st, int dt) {
    const int nv = op == OP_DX_RELU ? TILE / 4 : op == OP_DX ? TILE / 2 : TILE;
    const __mmask16 last = W % VEC ? first_lanes(W % VEC) : (__mmask16)0xFFFF;
    if (W > nv * VEC && (!is_dx(op) || dt == DT_BF16)) {
        rows_wide(op, x, dy, out, W, lo, hi, mw, sw, bw, hw, gsw, ghw, st, dt);
        return;
    }
    const int64_t rb = W <= nv * VEC ? hi - lo : APPLY_ROWS;
    for (int64_t r0 = lo; r0 < hi; r0 += rb) {
        const int64_t r1 = hi - r0 < rb ? hi : r0 + rb;
        int64_t j = 0;
        /* streaming (inputs from memory): the first tile prefetches whole rows (rows_pf) */
        for (; j + nv * VEC <= W; j += nv * VEC)
            rows_tile_apply(op, x, dy, out, W, r0, r1, j, nv, mw, sw, bw, hw, gsw, ghw, st,
                            tile_pf(st ? 2 : 0, j, W, nv), dt);
        for (; j + VEC <= W; j += VEC)
            rows_tile_apply(op, x, dy, out, W, r0, r1, j, 1, mw, sw, bw, hw, gsw, ghw, st, 0, dt);
        if (j < W) {
            const __m512 m = mw ? _mm512_maskz_loadu_ps(last, mw + j) : _mm512_setzero_ps();
            const __m512 sc = _mm512_maskz_loadu_ps(last, sw + j);
            const __m512 h = _mm512_maskz_loadu_ps(last, hw + j);
            const __m512 bb = is_dx(op) ? _mm512_maskz_loadu_ps(last, bw + j) : sc;
            const __m512 gs = op == OP_DX_RELU ? _mm512_maskz_loadu_ps(last, gsw + j) : sc;
            const __m512 gh = op == OP_DX_RELU ? _mm512_maskz_loadu_ps(last, ghw + j) : h;
            for (int64_t r = r0; r < r1; r++) {
                const __m512 v = opv_masked(op, x, dy, r * W + j, last, m, sc, bb, h, gs, gh, dt);
                VSTORE_MASKED(out, r * W + j, v, last, dt);
            }
        }
    }
}
#endif

/* op1_g at element i of column j (per-column coefficient vectors; mw NULL: no centre). */
INLINE float rows_op1(int op, const void *x, const void *dy, int64_t i, int64_t j, const float *mw, const float *sw,
                      const float *bw, const float *hw, const float *gsw, const float *ghw, int dt) {
    const int gated = op == OP_DX_RELU;
    return op1_g(op, x, dy, i, mw ? mw[j] : 0.f, sw[j], is_dx(op) ? bw[j] : 0.f, hw[j], gated ? gsw[j] : 0.f,
                 gated ? ghw[j] : 0.f, dt);
}

/* The tail rows of s (A % k original rows of Wc columns after the widened ones), value by value. */
INLINE void rows_tail(int op, const void *x, const void *dy, void *out, rows_shape s, const float *mw, const float *sw,
                      const float *bw, const float *hw, const float *gsw, const float *ghw, int dt) {
    for (int64_t r = 0; r < s.tail; r++) {
        const int64_t o = s.Ms * s.W + r * s.Wc;
        for (int64_t j = 0; j < s.Wc; j++)
            ST(out, o + j, rows_op1(op, x, dy, o + j, j, mw, sw, bw, hw, gsw, ghw, dt), dt);
    }
}

#if HAVE_AVX512 && defined(__AVX512BF16__) && !defined(NO_BF16_PAIRS)
#define BF16_PAIRS 32 /* rows_apply_pairs, 32 columns a step (AVX-512) */
#elif !HAVE_AVX512 && HAVE_STREAM && !defined(NO_BF16_PAIRS)
#define BF16_PAIRS 16 /* rows_apply_pairs, 16 columns a step (AVX2) */
#else
#define BF16_PAIRS 0
#endif

#define PAIRS_N (BF16_PAIRS ? BF16_PAIRS : 1) /* a divisor for the test below */
#if BF16_PAIRS
/* Coefficients per column (W of them, W % BF16_PAIRS == 0) in the order rows_apply_pairs reads them:
 * in each run of BF16_PAIRS columns, the even ones, then the odd ones. */
static void pairs_order(const float *v, float *p, int64_t W) {
    const int half = BF16_PAIRS / 2;
    for (int64_t j = 0; j < W; j += BF16_PAIRS)
        for (int i = 0; i < half; i++) {
            p[j + i] = v[j + 2 * i];
            p[j + half + i] = v[j + 2 * i + 1];
        }
}
#endif

#if BF16_PAIRS == 32
/* rows_apply_pairs' pass on nrows (a constant where inlined) whole rows from element o0: the
 * coefficients of each 32 columns loaded once for all of them. */
INLINE void pairs_rows(const void *x, void *y, int64_t W, int64_t o0, const int nrows, const float *sp,
                       const float *hp, __m512i order, __m512i odd) {
    for (int64_t j = 0; j < W; j += 32) {
        const __m512 se = _mm512_loadu_ps(sp + j), he = _mm512_loadu_ps(hp + j);
        const __m512 so = _mm512_loadu_ps(sp + j + 16), ho = _mm512_loadu_ps(hp + j + 16);
        for (int k = 0; k < nrows; k++) {
            const int64_t o = o0 + k * W;
            const __m512i h = _mm512_loadu_si512((const void *)((const uint16_t *)x + o + j));
            const __m512 xe = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
            const __m512 xo = _mm512_castsi512_ps(_mm512_and_si512(h, odd));
            const __m512 ye = _mm512_fmadd_ps(xe, se, he), yo = _mm512_fmadd_ps(xo, so, ho);
            const __m512i v = _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(yo, ye));
            prefetch_store(y, (o + j) * 2);
            _mm512_storeu_si512((void *)((uint16_t *)y + o + j), v);
        }
    }
}

/* bfloat16 y = x * s + h (eval, inference: no centre) on rows [lo, hi) of W % 32 == 0 columns, 32
 * values per step: one 512-bit load widened by a shift (even values) and a mask (odd ones), two
 * fused multiply-adds with the coefficients in pairs_order, one vcvtne2ps2bf16 and one permute back
 * to memory order. Bitwise rows_wide's result (the same float32 fma, the same rounding) in fewer
 * instructions than its two widening shuffles and two conversions. Regular stores (used in cache).
 * Rows of more than 2048 columns go WIDE_ROWS at a time, as in rows_wide (kernel_ab.py eval:
 * (512,8192) 443, 496 -> 298, 422 us; (1024,4096) 447, 390 -> 356, 295; at 2048 columns -6% to
 * +10%, noise; at 1024 none). */
static void rows_apply_pairs(const void *x, void *y, int64_t W, int64_t lo, int64_t hi, const float *sp,
                             const float *hp) {
    static const uint16_t back[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i order = _mm512_loadu_si512((const void *)back), odd = _mm512_set1_epi32((int)0xFFFF0000u);
    int64_t r = lo;
#if WIDE_ROWS > 1
    if (W * 8 > WIDE_MIN_BYTES) /* as rows_wide */
        for (; r + WIDE_ROWS <= hi; r += WIDE_ROWS) pairs_rows(x, y, W, r * W, WIDE_ROWS, sp, hp, order, odd);
#endif
    for (; r < hi; r++) pairs_rows(x, y, W, r * W, 1, sp, hp, order, odd);
}
#elif BF16_PAIRS == 16
/* The same on AVX2 (W % 16 == 0), 16 values per step: one 256-bit load split by a shift (even values)
 * and a mask (odd ones), two multiply-adds with the coefficients in pairs_order, and each result
 * rounded where it lies, the even ones to the low halves of the 32-bit lanes and the odd ones to the
 * high halves: one OR puts them back in memory order, without a shuffle (bf16x16 needs two). stream:
 * streaming stores (the rows start on 32 bytes). Bitwise the other paths' result: the same float32
 * multiply-add (fused where the compiler fuses affine1's), the same rounding. Eval, kernel_ab.py on AVX2
 * (-mno-avx512f), against the compiler's loop: (32,2048,7,7) channels_last 322 -> 264 us, (32,1024,14,14)
 * 596 -> 505, (4096,1024) 383 -> 253, (32,512,28,28) (streaming) 1147 -> 1097 (torch's AVX2 kernels 316,
 * 650, 402, 1217). */
static void rows_apply_pairs(const void *x, void *y, int64_t W, int64_t lo, int64_t hi, const float *sp,
                             const float *hp, int stream) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t r = lo; r < hi; r++)
        for (int64_t j = 0; j < W; j += 16) {
            const int64_t o = r * W + j;
            const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + o));
            const __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
            const __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(h, high));
            const __m256 se = _mm256_loadu_ps(sp + j), so = _mm256_loadu_ps(sp + j + 8);
            const __m256 he = _mm256_loadu_ps(hp + j), ho = _mm256_loadu_ps(hp + j + 8);
#ifdef __FMA__
            const __m256 ye = _mm256_fmadd_ps(xe, se, he), yo = _mm256_fmadd_ps(xo, so, ho);
#else
            const __m256 ye = _mm256_add_ps(_mm256_mul_ps(xe, se), he), yo = _mm256_add_ps(_mm256_mul_ps(xo, so), ho);
#endif
            put_h16(y, o, _mm256_or_si256(bf16_round8(ye), _mm256_and_si256(bf16_round8_high(yo), high)), stream);
        }
}
#endif

/* The elementwise pass over this thread's wide rows, with per-column coefficient vectors of
 * width W (the first Wc of them serve the tail rows); mw NULL: no centre (inference).
 * Streaming needs W % VEC == 0. */
INLINE void rows_elementwise(int op, const void *x, const void *dy, void *out, rows_shape s, const float *mw,
                             const float *sw, const float *bw, const float *hw, const float *gsw, const float *ghw,
                             int stream, int dt, int t, int T) {
    int64_t lo, hi, W = s.W;
    part(s.Ms, t, T, &lo, &hi);
#if HAVE_AVX512
    /* whole rows in vectors of 16, the last one of a row masked when W % 16 != 0; streaming
     * stores only when every row starts on a vector boundary */
    if (stream && W % VEC == 0)
        rows_avx512(op, x, dy, out, W, lo, hi, mw, sw, bw, hw, gsw, ghw, 1, dt);
    else
        rows_avx512(op, x, dy, out, W, lo, hi, mw, sw, bw, hw, gsw, ghw, 0, dt);
#else
#if !HAVE_STREAM
    (void)stream;
#endif
    for (int64_t r = lo; r < hi; r++) {
        const int64_t o = r * W;
#if HAVE_STREAM
        if (stream && W % STREAM_N == 0) { /* every row starts on a group */
            for (int64_t j = 0; j < W; j += STREAM_N) {
                float v[STREAM_N];
#pragma omp simd
                for (int k = 0; k < STREAM_N; k++)
                    v[k] = rows_op1(op, x, dy, o + j + k, j + k, mw, sw, bw, hw, gsw, ghw, dt);
                put16(out, o + j, v, 1, dt);
            }
            continue;
        }
#endif
#pragma omp simd
        for (int64_t j = 0; j < W; j++)
            ST(out, o + j, rows_op1(op, x, dy, o + j, j, mw, sw, bw, hw, gsw, ghw, dt), dt);
    }
#endif
    if (t == T - 1) rows_tail(op, x, dy, out, s, mw, sw, bw, hw, gsw, ghw, dt);
#if HAVE_STREAM
    if (stream) _mm_sfence();
#endif
}

/* Expand per-channel coefficients to per-column ones: v[j] = per_channel[(j / B) % C], j in [lo, hi). */
INLINE void expand(rows_shape s, const float *per_channel, float *v, int64_t lo, int64_t hi) {
    if (lo >= hi) return;
    int64_t q = lo / s.B, e = lo - q * s.B, c = q % s.C; /* column lo: element e of channel c */
    for (int64_t j = lo; j < hi; j++) { /* one division per call, not two per column */
        v[j] = per_channel[c];
        if (++e == s.B) {
            e = 0;
            if (++c == s.C) c = 0;
        }
    }
}

/* ------------------------------------------------------------------ per-channel epilogues */

/* Forward: from (mean, M2) of channel c, the outputs and the apply coefficients. */
/* fn(..., has_w, has_b) with the two flags as constants, one call per combination, so that the
 * per-channel loop inside fn has no branch and vectorizes. */
#define BY_WEIGHT_BIAS(w, b, fn, ...)                                                               \
    ((w) && (b) ? fn(__VA_ARGS__, 1, 1)                                                            \
                : (w) ? fn(__VA_ARGS__, 1, 0) : (b) ? fn(__VA_ARGS__, 0, 1) : fn(__VA_ARGS__, 0, 0))

INLINE void fwd_coeffs_loop(int64_t c0, int64_t c1, const double *restrict cmean, const double *restrict cm2,
                            double m, const float *restrict w, const float *restrict b, double eps,
                            float *restrict mean_out, float *restrict var_out, float *restrict ctr,
                            float *restrict scale, float *restrict shift, int has_w, int has_b) {
    for (int64_t c = c0; c < c1; c++) { /* has_w, has_b constant: no branch, so it vectorizes */
        double mean = cmean[c], var = cm2[c] / m;
        double invstd = 1.0 / sqrt(var + eps);
        double sc = has_w ? (double)w[c] * invstd : invstd;
        float mu_hi = (float)mean;
        double mu_lo = mean - (double)mu_hi;
        mean_out[c] = mu_hi;
        var_out[c] = (float)var;
        ctr[c] = mu_hi;
        scale[c] = (float)sc;
        shift[c] = (float)((has_b ? (double)b[c] : 0.0) - mu_lo * sc);
    }
}

/* For channels [c0, c1), from their means and M2 (sums of squared deviations) over m values. A
 * serial loop with branches cost ~10 ns a channel (sqrt and division latency): 20 us at C = 2048. */
static void fwd_coeffs(int64_t c0, int64_t c1, const double *cmean, const double *cm2, double m, const float *w,
                       const float *b, double eps, float *mean_out, float *var_out, float *ctr, float *scale,
                       float *shift) {
    BY_WEIGHT_BIAS(w, b, fwd_coeffs_loop, c0, c1, cmean, cm2, m, w, b, eps, mean_out, var_out, ctr, scale, shift);
}

/* Backward: dx = k*dy + b*(x - mean) + c' with k = w*invstd, b = -k*invstd^2*s2/m, c' = -k*s1/m. */
INLINE void bwd_coeffs(int64_t c, double s1, double s2, double m, const float *w, const float *invstd,
                       float *s1_out, float *s2_out, float *kk, float *bb, float *cc) {
    double is = (double)invstd[c], k = w ? (double)w[c] * is : is;
    s1_out[c] = (float)s1;
    s2_out[c] = (float)s2;
    kk[c] = (float)k;
    bb[c] = (float)(-k * is * is * s2 / m);
    cc[c] = (float)(-k * s1 / m);
}

/* Chan merge of (nb, mb, qb) into (na, ma, qa). */
INLINE void chan(double *na, double *ma, double *qa, double nb, double mb, double qb) {
    if (nb == 0.0) return;
    double n = *na + nb, d = mb - *ma;
    *ma += d * nb / n;
    *qa += qb + d * d * *na * nb / n;
    *na = n;
}

/* ------------------------------------------------------------------ channel groups */

/* BN is independent per channel, so in the planes path a thread can take a group of G channels
 * through both phases of the backward while their data are in its cache: the gradient sums,
 * then dx. The second read of x and dy comes from the cache instead of memory: for inputs larger
 * than the cache, 5 passes over memory become 3. The units, the sums' order and the coefficients
 * are the phase-by-phase path's, so are the results, bitwise. Float32 only: kernel_ab, four
 * runs in two states of the machine, float32 (32,64,112,112) 10-23% faster, (32,512,28,28)
 * 10-22%, (32,256,56,56) 0-25%; bfloat16, whose passes do twice the arithmetic per byte, 5-13%
 * faster in the slow state and 14-21% slower in the fast one. The forward by groups (statistics,
 * then the apply pass) was 10-12% faster or 2-11% slower with the state: not used. */
#ifndef GROUP_BYTES
#define GROUP_BYTES (1 << 20)
#endif
static int64_t group_bytes = GROUP_BYTES; /* a group's inputs: as many channels as fit (bn_set_group_bytes) */

/* Sets the group size in bytes of input (0: no channel groups, < 0: GROUP_BYTES); the single
 * channels that exceed it still make groups up to 4x its size. For tests and tuning. */
void bn_set_group_bytes(int64_t bytes) { group_bytes = bytes < 0 ? GROUP_BYTES : bytes; }

/* Channels per group for the backward of A * C * B values, or 0 for phase by phase: for
 * bfloat16; when x and dy are less than twice the cache (the phase-by-phase passes then find part
 * of them in the cache: bfloat16 (32, 512, 28, 28), 51 MB, was 6-16% slower by groups); or when
 * the smallest group's inputs exceed 4 * group_bytes (a single channel of 3.2 MB still gains, its
 * re-read served by the last-level cache). G is a multiple of the channels that make whole runs
 * of 64 values (so that streaming stores never share a cache line between groups), and small
 * enough to give every thread a group. */
static int64_t channel_group(int64_t A, int64_t C, int64_t B, int dt, int nt) {
    const int64_t per = A * B * (int64_t)sizeof(float) * 2; /* one channel's x and dy */
    int64_t g0 = 1;
    while ((g0 * B) % 64) g0 *= 2; /* 64 / gcd(B, 64) */
    if (dt != DT_F32 || group_bytes <= 0 || cache_bytes < 0 || per * C < 2 * cache_bytes || C % g0 ||
        g0 * per > 4 * group_bytes)
        return 0;
    int64_t G = group_bytes / per / g0 * g0, share = (C + nt - 1) / nt;
    if (G < g0) G = g0;
    if (share < G) G = (share + g0 - 1) / g0 * g0;
    return G;
}

/* channel_group of the training backward on nthreads threads (0: phase by phase). */
int64_t bn_channel_group(int dt, int64_t A, int64_t C, int64_t B, int nthreads) {
    return use_rows(A, C, B, dt) ? 0 : channel_group(A, C, B, dt, threads_for(A * C * B, nthreads));
}

/* ------------------------------------------------------------------ training forward */

/* fn(op, ...) for op (a variable) in the APPLY family, with op a constant in each call: one
 * specialized copy of an inlined pass per op, and none of what runs before it. */
#define BY_APPLY_OP(op, fn, ...)                                                                          \
    ((op) == OP_RELU ? fn(OP_RELU, __VA_ARGS__)                                                           \
                     : (op) == OP_ADD_RELU ? fn(OP_ADD_RELU, __VA_ARGS__) : fn(OP_APPLY, __VA_ARGS__))

INLINE void fwd_planes_body(int dt, int op, const void *x, const void *res, void *y, int64_t A, int64_t C,
                            int64_t B, const float *w, const float *b, double eps, float *mean_out, float *var_out,
                            double *r1, double *r2, double *cmean, double *cm2, float *coef, int stream) {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int64_t nch, L, c0, c1;
    plane_chunks(B, dt, &nch, &L);
    planes_units(x, NULL, NULL, NULL, NULL, A, C, B, 0, dt, r1, r2, t, T);
#pragma omp barrier
    part(C, t, T, &c0, &c1);
    planes_merge_stats(r1, r2, NULL, A, C, B, nch, L, c0, c1, cmean, cm2);
    fwd_coeffs(c0, c1, cmean, cm2, (double)(A * B), w, b, eps, mean_out, var_out, coef, coef + C, coef + 2 * C);
    if (!y) return; /* the statistics only */
#pragma omp barrier
    BY_APPLY_OP(op, planes_elementwise, x, res, y, A * C, C, B, coef, coef + C, NULL, coef + 2 * C, NULL, NULL, stream,
                dt, t, T);
#if HAVE_STREAM
    if (stream) _mm_sfence();
#endif
}

INLINE void fwd_rows_body(int dt, int op, const void *x, const void *res, void *y, rows_shape s, const float *w,
                          const float *b, double eps, float *mean_out, float *var_out, float *fscr, double *dscr,
                          double *an, double *cmean, double *cm2, float *coef, float *coefw, int stream) {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int64_t Wp = pad16(s.W), C = s.C, B = s.B, c0, c1;
    float *x0 = fscr + 3 * Wp * t, *sm = x0 + Wp, *q = sm + Wp;
    rows_stats_thread(x, s, dt, x0, sm, q, dscr + 2 * Wp * t, dscr + 2 * Wp * t + Wp, &an[t], t, T);
#pragma omp barrier
    part(C, t, T, &c0, &c1);
    const int64_t tail0 = s.Ms * s.W;
    for (int64_t c = c0; c < c1; c++) {
        double na = 0.0, ma = 0.0, qa = 0.0;
        for (int u = 0; u < T; u++) {
            const double *mb = dscr + 2 * Wp * u, *qb = mb + Wp;
            for (int64_t rep = 0; rep < s.k; rep++)
                for (int64_t e = 0; e < B; e++) {
                    int64_t j = rep * s.Wc + c * B + e;
                    chan(&na, &ma, &qa, an[u], mb[j], qb[j]);
                }
        }
        if (s.tail) { /* < k rows: two passes in float64 over their tail * B values */
            double tm = 0.0, tq = 0.0, nb = (double)(s.tail * B);
            for (int64_t r = 0; r < s.tail; r++)
                for (int64_t e = 0; e < B; e++) tm += (double)LD(x, tail0 + r * s.Wc + c * B + e, dt);
            tm /= nb;
            for (int64_t r = 0; r < s.tail; r++)
                for (int64_t e = 0; e < B; e++) {
                    double d = (double)LD(x, tail0 + r * s.Wc + c * B + e, dt) - tm;
                    tq += d * d;
                }
            chan(&na, &ma, &qa, nb, tm, tq);
        }
        cmean[c] = ma;
        cm2[c] = qa;
    }
    fwd_coeffs(c0, c1, cmean, cm2, (double)(s.A * B), w, b, eps, mean_out, var_out, coef, coef + C, coef + 2 * C);
    if (!y) return; /* the statistics only */
#pragma omp barrier
    part(s.W, t, T, &c0, &c1);
    for (int i = 0; i < 3; i++) expand(s, coef + i * C, coefw + i * s.W, c0, c1);
#pragma omp barrier
    BY_APPLY_OP(op, rows_elementwise, x, res, y, s, coefw, coefw + s.W, NULL, coefw + 2 * s.W, NULL, NULL, stream, dt,
                t, T);
}

/* After the forward: invstd = (var + eps)^-1/2 and, when running_mean is not NULL, PyTorch's
 * update (in float32, as torch's mul_/add_ on float32 buffers)
 *     running_mean = (1 - momentum) * running_mean + momentum * mean
 *     running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)
 * only if every channel's mean and unbiased var are finite (else 2, nothing written). */
static int finish_forward(int64_t C, double m, double eps, const float *mean, const float *var, float *invstd,
                          float *running_mean, float *running_var, double momentum) {
    if (invstd)
        for (int64_t c = 0; c < C; c++) invstd[c] = (float)(1.0 / sqrt((double)var[c] + eps));
    if (!running_mean || !running_var || m < 2.0) return 0;
    const float unbias = (float)(m / (m - 1.0)), keep = (float)(1.0 - momentum), mom = (float)momentum;
    for (int64_t c = 0; c < C; c++)
        if (!isfinite(mean[c]) || !isfinite(var[c] * unbias)) return 2;
    for (int64_t c = 0; c < C; c++) {
        running_mean[c] = running_mean[c] * keep + mom * mean[c];
        running_var[c] = running_var[c] * keep + mom * (var[c] * unbias);
    }
    return 0;
}

/* mean64 = cmean, var64 = cm2 / m per channel, where asked for (NULL: nothing). */
static void copy_moments(int64_t C, double m, const double *cmean, const double *cm2, double *mean64, double *var64) {
    if (!mean64 || !var64) return;
    for (int64_t c = 0; c < C; c++) {
        mean64[c] = cmean[c];
        var64[c] = cm2[c] / m;
    }
}

/* The running-statistics update of finish_forward for a forward that returned the batch's mean
 * and invstd = (var + eps)^-1/2 (float32 (C,)), as torch's kernel does: var = invstd^-2 - eps,
 * at least 0 (a NaN stays NaN and is refused). 0: updated; 2: not finite, nothing written. */
int bn_update_running(int64_t C, double m, double eps, const float *mean, const float *invstd, float *running_mean,
                      float *running_var, double momentum) {
    float *var = malloc(sizeof(float) * (size_t)(C > 0 ? C : 1));
    if (!var) return 1;
    for (int64_t c = 0; c < C; c++) {
        double v = 1.0 / ((double)invstd[c] * (double)invstd[c]) - eps;
        var[c] = (float)(v < 0.0 ? 0.0 : v);
    }
    int rc = finish_forward(C, m, eps, mean, var, NULL, running_mean, running_var, momentum);
    free(var);
    return rc;
}

/* PyTorch's update from a batch's mean and unbiased variance, float32 or (f64) float64 (C,),
 * computed elsewhere (the variants, the torch-ops path): in float32, as torch's mul_ / add_ on
 * float32 buffers, running = running * (1 - momentum) + momentum * batch, only if every value
 * is finite. 0: updated; 2: not finite, nothing written. */
int bn_update_running_unbiased(int f64, int64_t C, const void *mean, const void *unbiased, float *running_mean,
                               float *running_var, double momentum) {
    const float keep = (float)(1.0 - momentum), mom = (float)momentum;
    const double *md = mean, *ud = unbiased;
    const float *mf = mean, *uf = unbiased;
    for (int64_t c = 0; c < C; c++)
        if (!isfinite(f64 ? md[c] : (double)mf[c]) || !isfinite(f64 ? ud[c] : (double)uf[c])) return 2;
    for (int64_t c = 0; c < C; c++) { /* as torch: mul_ rounds, then add_(alpha) is one fused multiply-add */
        const float m = running_mean[c] * keep, v = running_var[c] * keep;
        running_mean[c] = fmaf(mom, f64 ? (float)md[c] : mf[c], m);
        running_var[c] = fmaf(mom, f64 ? (float)ud[c] : uf[c], v);
    }
    return 0;
}

INLINE double clip(double v, double lo, double hi) { return v < lo ? lo : v > hi ? hi : v; } /* NaN stays */

/* Batch renormalization's per-channel coefficients (Ioffe 2017) from the batch's float64 mean
 * and biased var and the running statistics: sigma = sqrt(running_var + eps), r = clip(sqrt(var
 * + eps) / sigma, 1/r_max, r_max), d = clip((mean - running_mean) / sigma, -d_max, d_max). With w
 * and b (NULL: 1 and 0), y = x_hat * (w r) + (w d + b), written for bn_apply as (x - centre) * a +
 * shift: centre the float32 mean, a = w r / sqrt(var + eps), shift = w d + b - (mean - centre) a
 * (float64, then rounded). Also w r (the backward's weight), r and d. Outputs float32 (C,). */
void bn_renorm_coefficients(int64_t C, const double *mean, const double *var, const float *running_mean,
                            const float *running_var, const float *w, const float *b, double eps, double r_max,
                            double d_max, float *scale_out, float *r_out, float *d_out, float *centre_out,
                            float *a_out, float *shift_out) {
    for (int64_t c = 0; c < C; c++) {
        const double sigma = sqrt((double)running_var[c] + eps), sd = sqrt(var[c] + eps);
        const double r = clip(sd / sigma, 1.0 / r_max, r_max);
        const double d = clip((mean[c] - (double)running_mean[c]) / sigma, -d_max, d_max);
        const double wc = w ? (double)w[c] : 1.0, scale = wc * r, a = scale * (1.0 / sd);
        const float centre = (float)mean[c];
        scale_out[c] = (float)scale;
        r_out[c] = (float)r;
        d_out[c] = (float)d;
        centre_out[c] = centre;
        a_out[c] = (float)a;
        shift_out[c] = (float)(wc * d + (b ? (double)b[c] : 0.0) - (mean[c] - (double)centre) * a);
    }
}

/* bn_train_forward with the apply pass `op` (APPLY, RELU, or ADD_RELU with the residual res);
 * with mean64 / var64 not NULL also the float64 mean and biased variance, and with coef_out (2 * C
 * floats) the apply pass's scale and shift: y = (x - mean) * scale + shift before the ReLU. */
static int train_forward(int op, int dt, const void *x, const void *res, void *y, int64_t A, int64_t C, int64_t B,
                         const float *w, const float *b, double eps, float *mean_out, float *var_out,
                         float *invstd_out, float *running_mean, float *running_var, double momentum, int nthreads,
                         double *mean64, double *var64, float *coef_out) {
    int64_t E = A * C * B;
    int nt = threads_for(E, nthreads), stream = use_stream(y, E * elem_size(dt), op == OP_ADD_RELU ? 3 : 2);
    advise_huge(y, E * elem_size(dt));
    if (!use_rows(A, C, B, dt)) {
        int64_t nch, L;
        plane_chunks(B, dt, &nch, &L);
        int64_t U = A * C * nch;
        double *r = malloc(sizeof(double) * (2 * U + 2 * C));
        float *coef = malloc(sizeof(float) * 3 * C);
        if (!r || !coef) { free(r); free(coef); return 1; }
#pragma omp parallel num_threads(nt)
        {
            if (dt == DT_F32)
                fwd_planes_body(DT_F32, op, x, res, y, A, C, B, w, b, eps, mean_out, var_out, r, r + U, r + 2 * U,
                                r + 2 * U + C, coef, stream);
            else
                fwd_planes_body(DT_BF16, op, x, res, y, A, C, B, w, b, eps, mean_out, var_out, r, r + U, r + 2 * U,
                                r + 2 * U + C, coef, stream);
        }
        copy_moments(C, (double)(A * B), r + 2 * U, r + 2 * U + C, mean64, var64);
        if (coef_out) memcpy(coef_out, coef + C, sizeof(float) * 2 * (size_t)C);
        free(r);
        free(coef);
    } else {
        rows_shape s = rows_layout(A, C, B);
        int64_t Wp = pad16(s.W);
        float *fscr = malloc(sizeof(float) * (3 * Wp * nt + 3 * C + 3 * s.W));
        double *dscr = malloc(sizeof(double) * (2 * Wp * nt + nt + 2 * C));
        if (!fscr || !dscr) { free(fscr); free(dscr); return 1; }
        float *coef = fscr + 3 * Wp * nt, *coefw = coef + 3 * C;
        double *an = dscr + 2 * Wp * nt, *cmean = an + nt, *cm2 = cmean + C;
#pragma omp parallel num_threads(nt)
        {
            if (dt == DT_F32)
                fwd_rows_body(DT_F32, op, x, res, y, s, w, b, eps, mean_out, var_out, fscr, dscr, an, cmean, cm2, coef,
                              coefw, stream);
            else
                fwd_rows_body(DT_BF16, op, x, res, y, s, w, b, eps, mean_out, var_out, fscr, dscr, an, cmean, cm2,
                              coef, coefw, stream);
        }
        copy_moments(C, (double)(A * B), cmean, cm2, mean64, var64);
        if (coef_out) memcpy(coef_out, coef + C, sizeof(float) * 2 * (size_t)C);
        free(fscr);
        free(dscr);
    }
    return finish_forward(C, (double)(A * B), eps, mean_out, var_out, invstd_out, running_mean, running_var,
                          momentum);
}

/* y = BN(x) with the batch statistics; mean (float32) and biased var (float32) per channel.
 * w, b: float32 (C,) or NULL. invstd_out (float32 (C,)) and the running statistics may be
 * NULL; see finish_forward. y NULL: the statistics only (x read once, chunk by chunk). */
int bn_train_forward(int dt, const void *x, void *y, int64_t A, int64_t C, int64_t B, const float *w,
                     const float *b, double eps, float *mean_out, float *var_out, float *invstd_out,
                     float *running_mean, float *running_var, double momentum, int nthreads) {
    return train_forward(OP_APPLY, dt, x, NULL, y, A, C, B, w, b, eps, mean_out, var_out, invstd_out, running_mean,
                         running_var, momentum, nthreads, NULL, NULL, NULL);
}

/* bn_train_forward followed by relu in the same pass: y = relu(BN(x) + res), res NULL: no
 * residual, else a tensor of x's dtype and layout. The statistics and running update are
 * bn_train_forward's; y is computed in float32 and rounded once. scale_shift (2 * C floats, or
 * NULL): the apply pass's scale and shift, for bn_train_backward_relu. */
int bn_train_forward_relu(int dt, const void *x, const void *res, void *y, int64_t A, int64_t C, int64_t B,
                          const float *w, const float *b, double eps, float *mean_out, float *var_out,
                          float *invstd_out, float *running_mean, float *running_var, double momentum,
                          float *scale_shift, int nthreads) {
    return train_forward(res ? OP_ADD_RELU : OP_RELU, dt, x, res, y, A, C, B, w, b, eps, mean_out, var_out,
                         invstd_out, running_mean, running_var, momentum, nthreads, NULL, NULL, scale_shift);
}

/* The statistics alone (x read once) as bn_train_forward computes them, and also in float64:
 * mean64 and var64 (biased), the values its y is centred with before they are rounded. */
int bn_statistics(int dt, const void *x, int64_t A, int64_t C, int64_t B, double eps, float *mean_out,
                  float *var_out, float *invstd_out, double *mean64, double *var64, int nthreads) {
    return train_forward(OP_APPLY, dt, x, NULL, NULL, A, C, B, NULL, NULL, eps, mean_out, var_out, invstd_out, NULL,
                         NULL, 0.0, nthreads, mean64, var64, NULL);
}

/* ------------------------------------------------------------------ training backward */

/* Channels [c0, c1)'s gradient sums, added in order a = 0.., k = 0.., and dx's coefficients. */
static void planes_bwd_coeffs(int64_t A, int64_t C, int64_t B, int64_t nch, int64_t c0, int64_t c1, const double *r1,
                              const double *r2, const float *w, const float *invstd, float *s1_out, float *s2_out,
                              float *coef) {
    for (int64_t c = c0; c < c1; c++) {
        double s1 = 0.0, s2 = 0.0;
        for (int64_t a = 0; a < A; a++)
            for (int64_t k = 0; k < nch; k++) {
                s1 += r1[(a * nch + k) * C + c];
                s2 += r2[(a * nch + k) * C + c];
            }
        bwd_coeffs(c, s1, s2, (double)(A * B), w, invstd, s1_out, s2_out, coef, coef + C, coef + 2 * C);
    }
}

/* The backward's bodies; gated (a constant): BN + ReLU's, dy gated by (x - mean) * gs + gh > 0. */
INLINE void bwd_planes_body(int dt, const int gated, const void *dy, const void *x, void *dx, int64_t A, int64_t C,
                            int64_t B, const float *w, const float *mean, const float *invstd, const float *gs,
                            const float *gh, float *s1_out, float *s2_out, double *r1, double *r2, float *coef,
                            int stream) {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int64_t nch, L, c0, c1;
    plane_chunks(B, dt, &nch, &L);
    planes_units(x, dy, mean, gs, gh, A, C, B, gated ? 2 : 1, dt, r1, r2, t, T);
#pragma omp barrier
    part(C, t, T, &c0, &c1);
    planes_bwd_coeffs(A, C, B, nch, c0, c1, r1, r2, w, invstd, s1_out, s2_out, coef);
    if (!dx) return;
#pragma omp barrier
    planes_elementwise(gated ? OP_DX_RELU : OP_DX, x, dy, dx, A * C, C, B, mean, coef, coef + C, coef + 2 * C, gs, gh,
                       stream, dt, t, T);
#if HAVE_STREAM
    if (stream) _mm_sfence();
#endif
}

/* bwd_planes_body by channel groups of G (channel_group): each thread its share of the groups. */
INLINE void bwd_groups_body(int dt, const int gated, const void *dy, const void *x, void *dx, int64_t A, int64_t C,
                            int64_t B, int64_t G, const float *w, const float *mean, const float *invstd,
                            const float *gs, const float *gh, float *s1_out, float *s2_out, double *r1, double *r2,
                            float *coef, int stream) {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int64_t nch, L, lo, hi;
    plane_chunks(B, dt, &nch, &L);
    part((C + G - 1) / G, t, T, &lo, &hi);
    for (int64_t g = lo; g < hi; g++) {
        const int64_t c0 = g * G, c1 = c0 + G < C ? c0 + G : C;
        for (int64_t a = 0; a < A; a++)
            planes_units_range(x, dy, mean, gs, gh, C, B, gated ? 2 : 1, dt, r1, r2, (a * C + c0) * nch,
                               (a * C + c1) * nch);
        planes_bwd_coeffs(A, C, B, nch, c0, c1, r1, r2, w, invstd, s1_out, s2_out, coef);
        for (int64_t a = 0; a < A; a++)
            planes_elementwise_run(gated ? OP_DX_RELU : OP_DX, x, dy, dx, C, B, mean, coef, coef + C, coef + 2 * C, gs,
                                   gh, stream, dt, a * C + c0, a * C + c1);
    }
#if HAVE_STREAM
    if (stream) _mm_sfence();
#endif
}

INLINE void bwd_rows_body(int dt, const int gated, const void *dy, const void *x, void *dx, rows_shape s,
                          const float *w, const float *mean, const float *invstd, const float *gs, const float *gh,
                          float *s1_out, float *s2_out, float *fscr, double *dscr, float *coef, float *coefw,
                          int stream) {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int64_t Wp = pad16(s.W), C = s.C, B = s.B, c0, c1;
    float *muw = coefw, *kw = coefw + s.W, *bw = coefw + 2 * s.W, *cw = coefw + 3 * s.W;
    float *gsw = gated ? coefw + 4 * s.W : NULL, *ghw = gated ? coefw + 5 * s.W : NULL;
    part(s.W, t, T, &c0, &c1);
    expand(s, mean, muw, c0, c1);
    if (gated) {
        expand(s, gs, gsw, c0, c1);
        expand(s, gh, ghw, c0, c1);
    }
#pragma omp barrier
    rows_grad_thread(dy, x, s, muw, gsw, ghw, dt, fscr + 2 * Wp * t, fscr + 2 * Wp * t + Wp, dscr + 2 * Wp * t,
                     dscr + 2 * Wp * t + Wp, t, T);
#pragma omp barrier
    part(C, t, T, &c0, &c1);
    const int64_t tail0 = s.Ms * s.W;
    for (int64_t c = c0; c < c1; c++) {
        double s1 = 0.0, s2 = 0.0;
        for (int u = 0; u < T; u++)
            for (int64_t rep = 0; rep < s.k; rep++)
                for (int64_t e = 0; e < B; e++) {
                    int64_t j = rep * s.Wc + c * B + e;
                    s1 += dscr[2 * Wp * u + j];
                    s2 += dscr[2 * Wp * u + Wp + j];
                }
        for (int64_t r = 0; r < s.tail; r++)
            for (int64_t e = 0; e < B; e++) {
                int64_t i = tail0 + r * s.Wc + c * B + e;
                double g = (double)LD(dy, i, dt);
                if (gated) g = gate1(1, (float)g, LD(x, i, dt) - mean[c], gs[c], gh[c]);
                s1 += g;
                s2 += g * ((double)LD(x, i, dt) - (double)mean[c]);
            }
        bwd_coeffs(c, s1, s2, (double)(s.A * B), w, invstd, s1_out, s2_out, coef, coef + C, coef + 2 * C);
    }
    if (!dx) return;
#pragma omp barrier
    part(s.W, t, T, &c0, &c1);
    for (int i = 0; i < 3; i++) expand(s, coef + i * C, coefw + (i + 1) * s.W, c0, c1);
#pragma omp barrier
    rows_elementwise(gated ? OP_DX_RELU : OP_DX, x, dy, dx, s, muw, kw, bw, cw, gsw, ghw, stream, dt, t, T);
}

/* fn(dt, gated, ...) with both constants. */
#define BY_DT_GATED(dt, gated, fn, ...)                                                                  \
    ((gated) ? ((dt) == DT_F32 ? fn(DT_F32, 1, __VA_ARGS__) : fn(DT_BF16, 1, __VA_ARGS__))               \
             : ((dt) == DT_F32 ? fn(DT_F32, 0, __VA_ARGS__) : fn(DT_BF16, 0, __VA_ARGS__)))

/* bn_train_backward; gs not NULL: BN + ReLU's (bn_train_backward_relu). */
static int train_backward(int dt, const void *dy, const void *x, void *dx, int64_t A, int64_t C, int64_t B,
                          const float *w, const float *mean, const float *invstd, const float *gs, const float *gh,
                          float *s1_out, float *s2_out, int nthreads) {
    int64_t E = A * C * B;
    int nt = threads_for(E, nthreads), stream = use_stream(dx, E * elem_size(dt), 3);
    advise_huge(dx, E * elem_size(dt));
    if (!use_rows(A, C, B, dt)) {
        int64_t nch, L;
        plane_chunks(B, dt, &nch, &L);
        int64_t U = A * C * nch;
        double *r = malloc(sizeof(double) * 2 * U);
        float *coef = malloc(sizeof(float) * 3 * C);
        if (!r || !coef) { free(r); free(coef); return 1; }
        const int64_t G = dx ? channel_group(A, C, B, dt, nt) : 0;
#pragma omp parallel num_threads(nt)
        {
            if (G)
                BY_DT_GATED(dt, gs != NULL, bwd_groups_body, dy, x, dx, A, C, B, G, w, mean, invstd, gs, gh, s1_out,
                            s2_out, r, r + U, coef, stream);
            else
                BY_DT_GATED(dt, gs != NULL, bwd_planes_body, dy, x, dx, A, C, B, w, mean, invstd, gs, gh, s1_out,
                            s2_out, r, r + U, coef, stream);
        }
        free(r);
        free(coef);
    } else {
        rows_shape s = rows_layout(A, C, B);
        int64_t Wp = pad16(s.W);
        float *fscr = malloc(sizeof(float) * (2 * Wp * nt + 3 * C + 6 * s.W)); /* coefw: 4 (6 gated) per column */
        double *dscr = malloc(sizeof(double) * 2 * Wp * nt);
        if (!fscr || !dscr) { free(fscr); free(dscr); return 1; }
        float *coef = fscr + 2 * Wp * nt, *coefw = coef + 3 * C;
#pragma omp parallel num_threads(nt)
        BY_DT_GATED(dt, gs != NULL, bwd_rows_body, dy, x, dx, s, w, mean, invstd, gs, gh, s1_out, s2_out, fscr, dscr,
                    coef, coefw, stream);
        free(fscr);
        free(dscr);
    }
    return 0;
}

/* s1 = sum(dy), s2 = sum(dy * (x - mean)) per channel (float32); if dx is not NULL also
 * dx = k*dy + b*(x - mean) + c' (see bwd_coeffs). dy, x, dx share the (A, C, B) layout. */
int bn_train_backward(int dt, const void *dy, const void *x, void *dx, int64_t A, int64_t C, int64_t B,
                      const float *w, const float *mean, const float *invstd, float *s1_out, float *s2_out,
                      int nthreads) {
    return train_backward(dt, dy, x, dx, A, C, B, w, mean, invstd, NULL, NULL, s1_out, s2_out, nthreads);
}

/* The backward of y = relu(BN(x)) without a stored mask: bn_train_backward with dy counted where
 * (x - mean) * scale + shift > 0, the forward's apply pass recomputed from x (scale, shift:
 * bn_train_forward_relu's outputs, so the test is bitwise the forward's). */
int bn_train_backward_relu(int dt, const void *dy, const void *x, void *dx, int64_t A, int64_t C, int64_t B,
                           const float *w, const float *mean, const float *invstd, const float *scale,
                           const float *shift, float *s1_out, float *s2_out, int nthreads) {
    return train_backward(dt, dy, x, dx, A, C, B, w, mean, invstd, scale, shift, s1_out, s2_out, nthreads);
}

/* ------------------------------------------------------------------ ghost batches */

/* Whether the threads take whole ghost batches (each one's passes on one thread) rather than
 * splitting every ghost batch: when there are enough of them to share out evenly and each is
 * small, so that one parallel region replaces G of them (ctypes A/B, 2 cores, fwd / bwd:
 * (4096, 256) in ghost batches of 32 rows 453 / 548 -> 253 / 297 us, of 256 rows 143 / 160 ->
 * 120 / 134 us, (1024, 128) of 128 30 / 37 -> 18 / 22 us, (64, 64, 28, 28) of 8 (1.6 MB each)
 * 567 / 878 -> 556 / 812 us; but (256, 64, 28, 28) of 32 (6.4 MB each) 2801 / 4285 -> 3080 /
 * 5013 us, hence the size limit). */
#define GHOST_THREAD_BLOCK_BYTES ((int64_t)2 << 20)
static int ghost_blocks_per_thread(int64_t G, int64_t block_bytes, int nt) {
    return nt > 1 && block_bytes <= GHOST_THREAD_BLOCK_BYTES && (G % nt == 0 || G >= 4 * nt);
}

/* The rows of ghost batch g: Ag, or what is left of the A rows for the last one. */
INLINE int64_t ghost_rows(int64_t A, int64_t Ag, int64_t g) { return A - g * Ag < Ag ? A - g * Ag : Ag; }

/* Ghost batch g of bn_ghost_forward's on `threads` threads. */
static int ghost_forward_one(int dt, const void *x, void *y, int64_t A, int64_t C, int64_t B, int64_t Ag, int64_t g,
                             const float *w, const float *b, double eps, float *mean_out, float *var_out,
                             float *invstd_out, int threads) {
    const int64_t row = C * B * elem_size(dt), a = g * Ag, n = ghost_rows(A, Ag, g);
    return bn_train_forward(dt, (const char *)x + a * row, (char *)y + a * row, n, C, B, w, b, eps, mean_out + g * C,
                            var_out + g * C, invstd_out + g * C, NULL, NULL, 0.0, threads);
}

/* The whole batch's mean and M2 (the sum of squared deviations), float64 (C,), from the G
 * ghost batches' mean and biased var (G, C), ghost batch g holding n_g of the A rows of B
 * values: mean = sum n_g mean_g / (A B), M2 = sum n_g (var_g + (mean_g - mean)^2). */
static void ghost_totals(int64_t A, int64_t C, int64_t B, int64_t Ag, const float *mean, const float *var,
                         double *total_mean, double *total_m2) {
    const int64_t G = (A + Ag - 1) / Ag;
    for (int64_t c = 0; c < C; c++) total_mean[c] = total_m2[c] = 0.0;
    for (int64_t g = 0; g < G; g++) {
        const double n = (double)(ghost_rows(A, Ag, g) * B);
        for (int64_t c = 0; c < C; c++) total_mean[c] += n * mean[g * C + c];
    }
    for (int64_t c = 0; c < C; c++) total_mean[c] /= (double)(A * B);
    for (int64_t g = 0; g < G; g++) {
        const double n = (double)(ghost_rows(A, Ag, g) * B);
        for (int64_t c = 0; c < C; c++) {
            const double d = mean[g * C + c] - total_mean[c];
            total_m2[c] += n * (var[g * C + c] + d * d);
        }
    }
}

/* Ghost batches: the A rows of the (A, C, B) view in consecutive blocks of Ag rows (the last
 * may have fewer), each normalized with its own statistics: one bn_train_forward per block,
 * its mean, var and invstd in row g of the (G, C) outputs, and the whole batch's mean and M2
 * merged from them in total_mean, total_m2 (float64 (C,); for the caller's running statistics,
 * which are not updated here). The whole output is advised huge pages first (each block alone
 * may be below HUGE_MIN_BYTES). */
int bn_ghost_forward(int dt, const void *x, void *y, int64_t A, int64_t C, int64_t B, int64_t Ag, const float *w,
                     const float *b, double eps, float *mean_out, float *var_out, float *invstd_out,
                     double *total_mean, double *total_m2, int nthreads) {
    const int64_t G = (A + Ag - 1) / Ag, row = C * B * elem_size(dt);
    advise_huge(y, A * row);
    const int nt = threads_for(A * C * B, nthreads);
    int rc = 0;
    if (ghost_blocks_per_thread(G, Ag * row, nt)) { /* (not one loop with if(): nested regions get 1 thread) */
#pragma omp parallel for num_threads(nt) schedule(static) reduction(max : rc)
        for (int64_t g = 0; g < G; g++) {
            const int r = ghost_forward_one(dt, x, y, A, C, B, Ag, g, w, b, eps, mean_out, var_out, invstd_out, 1);
            rc = r > rc ? r : rc;
        }
    } else {
        for (int64_t g = 0; g < G && !rc; g++)
            rc = ghost_forward_one(dt, x, y, A, C, B, Ag, g, w, b, eps, mean_out, var_out, invstd_out, nthreads);
    }
    if (!rc) ghost_totals(A, C, B, Ag, mean_out, var_out, total_mean, total_m2);
    return rc;
}

/* Ghost batch g of bn_ghost_backward's on `threads` threads. */
static int ghost_backward_one(int dt, const void *dy, const void *x, void *dx, int64_t A, int64_t C, int64_t B,
                              int64_t Ag, int64_t g, const float *w, const float *mean, const float *invstd,
                              float *s1_out, float *s2_out, int threads) {
    const int64_t row = C * B * elem_size(dt), a = g * Ag, n = ghost_rows(A, Ag, g);
    return bn_train_backward(dt, (const char *)dy + a * row, (const char *)x + a * row,
                             dx ? (char *)dx + a * row : NULL, n, C, B, w, mean + g * C, invstd + g * C,
                             s1_out + g * C, s2_out + g * C, threads);
}

/* The backward of bn_ghost_forward: per block bn_train_backward with its row g of mean and
 * invstd (G, C), its sums in row g of s1_out, s2_out (G, C); dx NULL: the sums only. */
int bn_ghost_backward(int dt, const void *dy, const void *x, void *dx, int64_t A, int64_t C, int64_t B, int64_t Ag,
                      const float *w, const float *mean, const float *invstd, float *s1_out, float *s2_out,
                      int nthreads) {
    const int64_t G = (A + Ag - 1) / Ag, row = C * B * elem_size(dt);
    advise_huge(dx, A * row);
    const int nt = threads_for(A * C * B, nthreads);
    int rc = 0;
    if (ghost_blocks_per_thread(G, Ag * row, nt)) {
#pragma omp parallel for num_threads(nt) schedule(static) reduction(max : rc)
        for (int64_t g = 0; g < G; g++) {
            const int r = ghost_backward_one(dt, dy, x, dx, A, C, B, Ag, g, w, mean, invstd, s1_out, s2_out, 1);
            rc = r > rc ? r : rc;
        }
        return rc;
    }
    for (int64_t g = 0; g < G && !rc; g++)
        rc = ghost_backward_one(dt, dy, x, dx, A, C, B, Ag, g, w, mean, invstd, s1_out, s2_out, nthreads);
    return rc;
}

/* ------------------------------------------------------------------ inference */

static int elementwise_pass(int op, int dt, const void *x, const void *dy, void *out, int64_t A, int64_t C, int64_t B,
                            const float *m, const float *s, const float *b, const float *h, int nthreads);


/* Eval-mode BN from the running statistics (float32 (C,); w, b may be NULL):
 * y = x * scale + shift, scale = w * (var + eps)^-1/2, shift = b - mean * scale. */
INLINE void eval_coeffs(int64_t C, const float *restrict mean, const float *restrict var, const float *restrict w,
                        const float *restrict b, double eps, float *restrict scale, float *restrict shift, int has_w,
                        int has_b) {
    for (int64_t c = 0; c < C; c++) { /* has_w, has_b constant: no branch, so it vectorizes */
        double sc = 1.0 / sqrt((double)var[c] + eps);
        if (has_w) sc *= (double)w[c];
        scale[c] = (float)sc;
        shift[c] = (float)((has_b ? (double)b[c] : 0.0) - (double)mean[c] * sc);
    }
}

static int eval_pass(int op, int dt, const void *x, const void *res, void *y, int64_t A, int64_t C, int64_t B,
                     const float *mean, const float *var, const float *w, const float *b, double eps, int nthreads) {
    float *coef = malloc(sizeof(float) * 2 * (size_t)C);
    if (!coef) return 1;
    BY_WEIGHT_BIAS(w, b, eval_coeffs, C, mean, var, w, b, eps, coef, coef + C);
    int rc = elementwise_pass(op, dt, x, res, y, A, C, B, NULL, coef, NULL, coef + C, nthreads);
    free(coef);
    return rc;
}

int bn_eval(int dt, const void *x, void *y, int64_t A, int64_t C, int64_t B, const float *mean, const float *var,
            const float *w, const float *b, double eps, int nthreads) {
    return eval_pass(OP_APPLY, dt, x, NULL, y, A, C, B, mean, var, w, b, eps, nthreads);
}

/* y = relu(eval BN(x) + res) in one pass (res NULL: no residual, else of x's dtype and layout). */
int bn_eval_relu(int dt, const void *x, const void *res, void *y, int64_t A, int64_t C, int64_t B, const float *mean,
                 const float *var, const float *w, const float *b, double eps, int nthreads) {
    return eval_pass(res ? OP_ADD_RELU : OP_RELU, dt, x, res, y, A, C, B, mean, var, w, b, eps, nthreads);
}

/* y = x * scale + shift per channel (scale, shift float32 (C,)). */
int bn_inference(int dt, const void *x, void *y, int64_t A, int64_t C, int64_t B, const float *scale,
                 const float *shift, int nthreads) {
    return elementwise_pass(OP_APPLY, dt, x, NULL, y, A, C, B, NULL, scale, NULL, shift, nthreads);
}

/* One elementwise pass with per-channel coefficients (float32 (C,)), in the planes or rows path:
 * APPLY out = (x - m) * s + h (m NULL: 0), DX out = s * dy + b * (x - m) + h; RELU and ADD_RELU
 * (dy: the residual) as APPLY, then the activation. */
/* planes_elementwise / rows_elementwise with op (a variable) a constant in each call. */
INLINE void planes_by_op(int op, const void *x, const void *dy, void *out, int64_t P, int64_t C, int64_t B,
                         const float *m, const float *s, const float *b, const float *h, int stream, int dt, int t,
                         int T) {
    if (op == OP_DX)
        planes_elementwise(OP_DX, x, dy, out, P, C, B, m, s, b, h, NULL, NULL, stream, dt, t, T);
    else
        BY_APPLY_OP(op, planes_elementwise, x, dy, out, P, C, B, m, s, b, h, NULL, NULL, stream, dt, t, T);
}

INLINE void rows_by_op(int op, const void *x, const void *dy, void *out, rows_shape r, const float *mw,
                       const float *sw, const float *bw, const float *hw, int stream, int dt, int t, int T) {
    if (op == OP_DX)
        rows_elementwise(OP_DX, x, dy, out, r, mw, sw, bw, hw, NULL, NULL, stream, dt, t, T);
    else
        BY_APPLY_OP(op, rows_elementwise, x, dy, out, r, mw, sw, bw, hw, NULL, NULL, stream, dt, t, T);
}

static int elementwise_pass(int op, int dt, const void *x, const void *dy, void *out, int64_t A, int64_t C, int64_t B,
                            const float *m, const float *s, const float *b, const float *h, int nthreads) {
    int64_t E = A * C * B;
    int nt = threads_for(E, nthreads);
    int stream = use_stream(out, E * elem_size(dt), op == OP_DX || op == OP_ADD_RELU ? 3 : 2);
    advise_huge(out, E * elem_size(dt));
    if (!use_rows(A, C, B, dt)) {
        float *zero = m ? NULL : calloc((size_t)C, sizeof(float));
        if (!m && !zero) return 1;
        const float *mm = m ? m : zero;
#pragma omp parallel num_threads(nt)
        {
            int t = omp_get_thread_num(), T = omp_get_num_threads();
            if (dt == DT_F32)
                planes_by_op(op, x, dy, out, A * C, C, B, mm, s, b, h, stream, DT_F32, t, T);
            else
                planes_by_op(op, x, dy, out, A * C, C, B, mm, s, b, h, stream, DT_BF16, t, T);
#if HAVE_STREAM
            if (stream) _mm_sfence();
#endif
        }
        free(zero);
    } else {
        rows_shape r = rows_layout(A, C, B);
        /* in pairs where the pass is bound by its arithmetic: AVX-512 in cache (memory-bound, the widening
         * shuffles measured 3% faster than pairs' 512-bit streaming stores), AVX2 always */
        const int pairs = BF16_PAIRS && dt == DT_BF16 && op == OP_APPLY && !m && r.W % PAIRS_N == 0 &&
                          (!stream || BF16_PAIRS == 16);
        float *coefw = malloc(sizeof(float) * (pairs ? 6 : 4) * (size_t)r.W); /* per column: m, s, b, h (, s, h) */
        if (!coefw) return 1;
        float *mw = m ? coefw : NULL, *sw = coefw + r.W, *bw = coefw + 2 * r.W, *hw = coefw + 3 * r.W;
        if (m) expand(r, m, mw, 0, r.W);
        expand(r, s, sw, 0, r.W);
        if (op == OP_DX) expand(r, b, bw, 0, r.W);
        expand(r, h, hw, 0, r.W);
#if BF16_PAIRS
        if (pairs) {
            pairs_order(sw, coefw + 4 * r.W, r.W);
            pairs_order(hw, coefw + 5 * r.W, r.W);
        }
#endif
#pragma omp parallel num_threads(nt)
        {
            int t = omp_get_thread_num(), T = omp_get_num_threads();
#if BF16_PAIRS
            if (pairs) {
                int64_t lo, hi;
                part(r.Ms, t, T, &lo, &hi);
#if BF16_PAIRS == 32
                rows_apply_pairs(x, out, r.W, lo, hi, coefw + 4 * r.W, coefw + 5 * r.W);
#else
                rows_apply_pairs(x, out, r.W, lo, hi, coefw + 4 * r.W, coefw + 5 * r.W, stream);
                if (stream) _mm_sfence();
#endif
                if (t == T - 1) rows_tail(OP_APPLY, x, NULL, out, r, NULL, sw, NULL, hw, NULL, NULL, DT_BF16);
            } else
#endif
            if (dt == DT_F32)
                rows_by_op(op, x, dy, out, r, mw, sw, op == OP_DX ? bw : NULL, hw, stream, DT_F32, t, T);
            else
                rows_by_op(op, x, dy, out, r, mw, sw, op == OP_DX ? bw : NULL, hw, stream, DT_BF16, t, T);
        }
        free(coefw);
    }
    return 0;
}

/* y = (x - centre) * scale + shift per channel (float32 (C,); centre NULL: 0). With centre the
 * high float32 part of a mean and shift carrying its low part (fwd_coeffs' form), data with a
 * large offset keep float32 precision in y. */
int bn_apply(int dt, const void *x, void *y, int64_t A, int64_t C, int64_t B, const float *centre,
             const float *scale, const float *shift, int nthreads) {
    return elementwise_pass(OP_APPLY, dt, x, NULL, y, A, C, B, centre, scale, NULL, shift, nthreads);
}

/* dx = k * dy + b * (x - centre) + c per channel (float32 (C,)): bn_train_backward's dx pass
 * with coefficients the caller computed (e.g. from sums over several processes). */
int bn_input_grad(int dt, const void *dy, const void *x, void *dx, int64_t A, int64_t C, int64_t B,
                  const float *centre, const float *k, const float *b, const float *c, int nthreads) {
    return elementwise_pass(OP_DX, dt, x, dy, dx, A, C, B, centre, k, b, c, nthreads);
}

/* ------------------------------------------------------------------ masks over planes */

/* Masked BN (padded sequences) on a contiguous (A, C, B) array, e.g. (N, C, L) with axis 1:
 * `mask` holds A*B bytes, mask[a*B + e] != 0 where value e of row a's planes (every channel's)
 * is real. The statistics and the gradients come from the real values alone; y and dx are 0 at
 * the padding, whose values are never used (they may be NaN or Inf: selected away, never
 * multiplied by 0). Units are the plane chunks of planes_units; chunk (a, k) has the same real
 * count in every channel. A chunk's statistics take two passes from x0 = its first real value,
 * as seg_stats', merged by planes_merge_stats weighted by the chunks' real counts. With AVX-512,
 * 16 mask bytes become a lane mask (vptestmb) for masked adds and stores, and where a plane is
 * one chunk the horizontal sums go 16 planes at a time (as planes16_stats); the portable C
 * loops select on the mask byte. Threads split the elementwise pass by whole planes. */

/* The real count of chunk u = a * nch + k, into cnt[u], for this thread's share of the chunks. */
static void mask_counts(const uint8_t *mask, int64_t A, int64_t B, int64_t nch, int64_t L, double *cnt, int t,
                        int T) {
    int64_t lo, hi;
    part(A * nch, t, T, &lo, &hi);
    for (int64_t u = lo; u < hi; u++) {
        const int64_t start = (u % nch) * L, n = B - start < L ? B - start : L;
        const uint8_t *mk = mask + (u / nch) * B + start;
        int64_t real = 0;
#pragma omp simd reduction(+ : real)
        for (int64_t i = 0; i < n; i++) real += mk[i] != 0;
        cnt[u] = (double)real;
    }
}

INLINE double mask_total(const double *cnt, int64_t U) {
    double m = 0.0;
    for (int64_t u = 0; u < U; u++) m += cnt[u];
    return m;
}

#if HAVE_AVX512
/* The 16 mask bytes at mk + i as a lane mask (lanes of nonzero bytes set); the last partial vector
 * (n - i < 16 values left) reads only those bytes. */
INLINE __mmask16 mask16(const uint8_t *mk, int64_t i, int64_t n) {
    const __m128i m = n - i >= VEC ? _mm_loadu_si128((const __m128i *)(mk + i))
                                   : _mm_maskz_loadu_epi8(first_lanes(n - i), mk + i);
    return _mm_test_epi8_mask(m, m);
}

/* Pass 1 of mseg_stats: the sum of x - x0 over the real values among the n at off (padding may
 * be NaN: never added). */
INLINE __m512 mseg_sum(const void *x, const uint8_t *mk, int64_t off, int64_t n, __m512 x0, int dt) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t i = 0;
    for (; i + VEC <= n; i += VEC)
        a0 = _mm512_mask_add_ps(a0, mask16(mk, i, n), a0, _mm512_sub_ps(VLD(x, off + i, dt), x0));
    if (i < n) {
        const __mmask16 k = mask16(mk, i, n);
        a1 = _mm512_mask_add_ps(a1, k, a1, _mm512_sub_ps(VLDM(x, off + i, k, dt), x0));
    }
    return _mm512_add_ps(a0, a1);
}

/* Pass 2: the sum of ((x - x0) - dm)^2 over the real values. */
INLINE __m512 mseg_sq(const void *x, const uint8_t *mk, int64_t off, int64_t n, __m512 x0, __m512 dm, int dt) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t i = 0;
    for (; i + VEC <= n; i += VEC) {
        const __m512 d = _mm512_sub_ps(_mm512_sub_ps(VLD(x, off + i, dt), x0), dm);
        a0 = _mm512_mask3_fmadd_ps(d, d, a0, mask16(mk, i, n));
    }
    if (i < n) {
        const __mmask16 k = mask16(mk, i, n);
        const __m512 d = _mm512_sub_ps(_mm512_sub_ps(VLDM(x, off + i, k, dt), x0), dm);
        a1 = _mm512_mask3_fmadd_ps(d, d, a1, k);
    }
    return _mm512_add_ps(a0, a1);
}

/* The first real value among the n at off (0 if none). */
INLINE float first_real(const void *x, const uint8_t *mk, int64_t off, int64_t n, int dt) {
    for (int64_t i = 0; i < n; i++)
        if (mk[i]) return LD(x, off + i, dt);
    return 0.f;
}

/* Mean and M2 of the cnt >= 1 real values among x[off : off+n] (mk: their n mask bytes): the
 * two passes of seg_stats from x0 = the first real value, adding only the real lanes. */
INLINE void mseg_stats(const void *x, const uint8_t *mk, int64_t off, int64_t n, double cnt, int dt, double *mean,
                       double *m2) {
    const float x0f = first_real(x, mk, off, n, dt);
    const __m512 x0 = _mm512_set1_ps(x0f);
    const float dmf = _mm512_reduce_add_ps(mseg_sum(x, mk, off, n, x0, dt)) / (float)cnt; /* mean of x - x0 */
    *mean = (double)x0f + (double)dmf;
    *m2 = (double)_mm512_reduce_add_ps(mseg_sq(x, mk, off, n, x0, _mm512_set1_ps(dmf), dt));
}

/* sum(dy) and sum(dy * (x - m)) over the real values among the n at off, as vectors. */
INLINE void mseg_grad_acc(const void *dy, const void *x, const uint8_t *mk, int64_t off, int64_t n, __m512 m, int dt,
                          __m512 *s1, __m512 *s2) {
    __m512 a1 = _mm512_setzero_ps(), a2 = a1;
    for (int64_t i = 0; i < n; i += VEC) {
        const __mmask16 k = mask16(mk, i, n);
        const __m512 g = i + VEC <= n ? VLD(dy, off + i, dt) : VLDM(dy, off + i, k, dt);
        const __m512 xm = _mm512_sub_ps(i + VEC <= n ? VLD(x, off + i, dt) : VLDM(x, off + i, k, dt), m);
        a1 = _mm512_mask_add_ps(a1, k, a1, g);
        a2 = _mm512_mask3_fmadd_ps(g, xm, a2, k);
    }
    *s1 = a1;
    *s2 = a2;
}

INLINE void mseg_grad_sums(const void *dy, const void *x, const uint8_t *mk, int64_t off, int64_t n, float mu,
                           int dt, double *s1, double *s2) {
    __m512 v1, v2;
    mseg_grad_acc(dy, x, mk, off, n, _mm512_set1_ps(mu), dt, &v1, &v2);
    *s1 = (double)_mm512_reduce_add_ps(v1);
    *s2 = (double)_mm512_reduce_add_ps(v2);
}

/* mseg_stats of the 16 whole planes p0 .. p0+15 (one chunk each: slot = plane), the horizontal
 * sums 16 at a time (as planes16_stats). Planes without a real value get NaN, which the merge
 * never reads (it skips count 0). */
INLINE void mplanes16_stats(const void *x, const uint8_t *mask, const double *cnt, int64_t p0, int64_t C, int64_t B,
                            int dt, double *r1, double *r2) {
    __m512 v[16];
    float x0a[16], na[16];
    const uint8_t *mk[16];
    for (int64_t j = 0, a = p0 / C, c = p0 % C; j < 16; j++) {
        mk[j] = mask + a * B;
        x0a[j] = first_real(x, mk[j], (p0 + j) * B, B, dt);
        na[j] = (float)cnt[a];
        v[j] = mseg_sum(x, mk[j], (p0 + j) * B, B, _mm512_set1_ps(x0a[j]), dt);
        if (++c == C) {
            c = 0;
            a++;
        }
    }
    const __m512 dm = _mm512_div_ps(reduce16(v), _mm512_loadu_ps(na)); /* mean of x - x0, per plane */
    for (int j = 0; j < 16; j++)
        v[j] = mseg_sq(x, mk[j], (p0 + j) * B, B, _mm512_set1_ps(x0a[j]),
                       _mm512_permutexvar_ps(_mm512_set1_epi32(j), dm), dt);
    double mx[16], md[16];
    store16_pd(mx, _mm512_loadu_ps(x0a));
    store16_pd(md, dm);
    for (int j = 0; j < 16; j++) r1[p0 + j] = mx[j] + md[j]; /* as mseg_stats: x0 + dm in double */
    store16_pd(r2 + p0, reduce16(v));
}

/* mseg_grad_sums of the 16 whole planes p0 .. p0+15 (slot = plane), 16 horizontal sums at a time. */
INLINE void mplanes16_grad(const void *dy, const void *x, const uint8_t *mask, const float *mu, int64_t p0, int64_t C,
                           int64_t B, int dt, double *r1, double *r2) {
    __m512 v1[16], v2[16];
    for (int64_t j = 0, a = p0 / C, c = p0 % C; j < 16; j++) {
        mseg_grad_acc(dy, x, mask + a * B, (p0 + j) * B, B, _mm512_set1_ps(mu[c]), dt, &v1[j], &v2[j]);
        if (++c == C) {
            c = 0;
            a++;
        }
    }
    store16_pd(r1 + p0, reduce16(v1));
    store16_pd(r2 + p0, reduce16(v2));
}
#else
/* v where the mask byte k is set, else +0: as `k ? v : 0.f` bit for bit, but as an AND of the bits,
 * which the compiler vectorizes (a select between a byte and a float it left scalar). On AVX2
 * (-mno-avx512f), a masked BatchNorm1d over (32,512,128) ~60% real, fwd+bwd: float32 5.5-6.4 -> 2.9 ms,
 * bfloat16 6.7-7.2 -> 2.8-2.9 (the AVX-512 build: 2.4, 1.8). */
INLINE float keep_if(uint8_t k, float v) {
    union { float f; uint32_t u; } b = {v};
    b.u &= 0u - (uint32_t)(k != 0);
    return b.f;
}

/* Mean and M2 of the cnt >= 1 real values among x[off : off+n] (mk: their n mask bytes). */
INLINE void mseg_stats(const void *x, const uint8_t *mk, int64_t off, int64_t n, double cnt, int dt, double *mean,
                       double *m2) {
    int64_t i = 0;
    while (!mk[i]) i++;
    const float x0 = LD(x, off + i, dt);
    float acc[LANES];
    for (int j = 0; j < LANES; j++) acc[j] = 0.f;
    for (i = 0; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            const float v = LD(x, off + i + j, dt) - x0;
            acc[j] += keep_if(mk[i + j], v);
        }
    for (int j = 0; i + j < n; j++) {
        const float v = LD(x, off + i + j, dt) - x0;
        acc[j] += keep_if(mk[i + j], v);
    }
    const float dm = lanes_sum(acc) / (float)cnt; /* mean of x - x0 */
    for (int j = 0; j < LANES; j++) acc[j] = 0.f;
    for (i = 0; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            const float d = (LD(x, off + i + j, dt) - x0) - dm;
            acc[j] += keep_if(mk[i + j], d * d);
        }
    for (int j = 0; i + j < n; j++) {
        const float d = (LD(x, off + i + j, dt) - x0) - dm;
        acc[j] += keep_if(mk[i + j], d * d);
    }
    *mean = (double)x0 + (double)dm;
    *m2 = (double)lanes_sum(acc);
}

/* sum(dy) and sum(dy * (x - mu)) over the real values among the n at off. */
INLINE void mseg_grad_sums(const void *dy, const void *x, const uint8_t *mk, int64_t off, int64_t n, float mu,
                           int dt, double *s1, double *s2) {
    float a1[LANES], a2[LANES];
    int64_t i;
    for (int j = 0; j < LANES; j++) a1[j] = a2[j] = 0.f;
    for (i = 0; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            const float g = LD(dy, off + i + j, dt), gx = g * (LD(x, off + i + j, dt) - mu);
            a1[j] += keep_if(mk[i + j], g);
            a2[j] += keep_if(mk[i + j], gx);
        }
    for (int j = 0; i + j < n; j++) {
        const float g = LD(dy, off + i + j, dt), gx = g * (LD(x, off + i + j, dt) - mu);
        a1[j] += keep_if(mk[i + j], g);
        a2[j] += keep_if(mk[i + j], gx);
    }
    *s1 = (double)lanes_sum(a1);
    *s2 = (double)lanes_sum(a2);
}
#endif

/* planes_units with the mask: results in r1/r2[u * C + c] for chunk u = a * nch + k of channel
 * c; grad = 0: (mean, M2) of chunks with real values (the others are skipped; the merge skips
 * them too); grad = 1: (sum dy, sum dy * (x - mu[c])), 0 for chunks without real values. */
INLINE void mplanes_units(const void *x, const void *dy, const uint8_t *mask, const float *mu, int64_t A, int64_t C,
                          int64_t B, int64_t nch, int64_t L, const double *cnt, int grad, int dt, double *r1,
                          double *r2, int t, int T) {
    int64_t lo, hi;
    part(A * C * nch, t, T, &lo, &hi);
    if (lo >= hi) return;
#if HAVE_AVX512
    if (nch == 1) { /* whole planes, 16 at a time (unit = plane = slot; the rest below) */
        for (; lo + 16 <= hi; lo += 16)
            if (grad)
                mplanes16_grad(dy, x, mask, mu, lo, C, B, dt, r1, r2);
            else
                mplanes16_stats(x, mask, cnt, lo, C, B, dt, r1, r2);
    }
#endif
    int64_t p = lo / nch, k = lo % nch, c = p % C, a = p / C; /* unit (a * C + c) * nch + k, advanced */
    for (int64_t w = lo; w < hi; w++) {
        const int64_t u = a * nch + k, slot = u * C + c, start = k * L, n = B - start < L ? B - start : L;
        const uint8_t *mk = mask + a * B + start;
        if (cnt[u] == 0.0)
            r1[slot] = r2[slot] = 0.0;
        else if (grad)
            mseg_grad_sums(dy, x, mk, p * B + start, n, mu[c], dt, &r1[slot], &r2[slot]);
        else
            mseg_stats(x, mk, p * B + start, n, cnt[u], dt, &r1[slot], &r2[slot]);
        if (++k == nch) {
            k = 0;
            p++;
            if (++c == C) {
                c = 0;
                a++;
            }
        }
    }
}

/* The elementwise pass (APPLY or DX, see opv) with the mask: 0 at the padding. Threads take
 * whole planes; a plane's last vector ends at its end (overlapping the one before, as in
 * planes_elementwise_cached), or planes shorter than a vector take masked loads and stores. */
#if HAVE_AVX512
INLINE void mplanes_elementwise(int op, const void *x, const void *dy, const uint8_t *mask, void *out, int64_t A,
                                int64_t C, int64_t B, const float *m, const float *s, const float *b,
                                const float *h, int dt, int t, int T) {
    int64_t lo, hi;
    part(A * C, t, T, &lo, &hi);
    for (int64_t p = lo, c = lo % C; p < hi; p++) {
        const uint8_t *mk = mask + (p / C) * B;
        const __m512 vm = _mm512_set1_ps(m[c]), vs = _mm512_set1_ps(s[c]), vh = _mm512_set1_ps(h[c]);
        const __m512 vb = op == OP_DX ? _mm512_set1_ps(b[c]) : vs;
        const int64_t o = p * B;
        if (B >= VEC) {
            for (int64_t e = 0; e < B; e += VEC) {
                const int64_t f = e + VEC <= B ? e : B - VEC; /* the last vector ends at the plane's end */
                const __m512 v = opv(op, x, dy, o + f, vm, vs, vb, vh, dt);
                VSTORE(out, o + f, _mm512_maskz_mov_ps(mask16(mk, f, B), v), dt);
            }
        } else {
            const __mmask16 k = first_lanes(B);
            const __m512 xm = _mm512_sub_ps(VLDM(x, o, k, dt), vm);
            const __m512 v = op == OP_APPLY ? _mm512_fmadd_ps(xm, vs, vh)
                                            : _mm512_fmadd_ps(vs, VLDM(dy, o, k, dt), _mm512_fmadd_ps(vb, xm, vh));
            VSTORE_MASKED(out, o, _mm512_maskz_mov_ps(mask16(mk, 0, B), v), k, dt);
        }
        if (++c == C) c = 0;
    }
}
#else
INLINE void mplanes_elementwise(int op, const void *x, const void *dy, const uint8_t *mask, void *out, int64_t A,
                                int64_t C, int64_t B, const float *m, const float *s, const float *b,
                                const float *h, int dt, int t, int T) {
    int64_t lo, hi;
    part(A * C, t, T, &lo, &hi);
    for (int64_t p = lo, c = lo % C; p < hi; p++) {
        const uint8_t *mk = mask + (p / C) * B;
        const float vm = m[c], vs = s[c], vb = op == OP_DX ? b[c] : 0.f, vh = h[c];
        const int64_t o = p * B;
#pragma omp simd
        for (int64_t e = 0; e < B; e++) {
            const float v = op1(op, x, dy, o + e, vm, vs, vb, vh, dt);
            ST(out, o + e, keep_if(mk[e], v), dt);
        }
        if (++c == C) c = 0;
    }
}
#endif

/* The reductions of both bodies, in a parallel region: the chunks' real counts, then (grad 0)
 * their statistics or (grad 1) their sums; every thread's results are in when it returns. */
INLINE void mplanes_reduce(const void *x, const void *dy, const uint8_t *mask, const float *mu, int64_t A, int64_t C,
                           int64_t B, int64_t nch, int64_t L, double *cnt, int grad, int dt, double *r1, double *r2,
                           int t, int T) {
    mask_counts(mask, A, B, nch, L, cnt, t, T);
#pragma omp barrier
    mplanes_units(x, dy, mask, mu, A, C, B, nch, L, cnt, grad, dt, r1, r2, t, T);
#pragma omp barrier
}

INLINE void mfwd_body(int dt, const void *x, const uint8_t *mask, void *y, int64_t A, int64_t C, int64_t B,
                      const float *w, const float *b, double eps, float *mean_out, float *var_out, double *cnt,
                      double *r1, double *r2, double *cmean, double *cm2, float *coef) {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int64_t nch, L, c0, c1;
    plane_chunks(B, dt, &nch, &L);
    mplanes_reduce(x, NULL, mask, NULL, A, C, B, nch, L, cnt, 0, dt, r1, r2, t, T);
    part(C, t, T, &c0, &c1);
    planes_merge_stats(r1, r2, cnt, A, C, B, nch, L, c0, c1, cmean, cm2);
    const double m = mask_total(cnt, A * nch);
    fwd_coeffs(c0, c1, cmean, cm2, m > 0.0 ? m : 1.0, w, b, eps, mean_out, var_out, coef, coef + C, coef + 2 * C);
#pragma omp barrier
    mplanes_elementwise(OP_APPLY, x, NULL, mask, y, A, C, B, coef, coef + C, NULL, coef + 2 * C, dt, t, T);
}

/* Masks over rows (B == 1: the channels last, (N, L, C) with axis=-1, channels_last, 2-D): one
 * mask byte per row of C values. Threads take contiguous ranges of rows, in blocks of at most
 * MROWS_BLOCK_BYTES (in L2); a block's statistics take two passes over its real rows from x0 =
 * its first real row (float32 sums per column), merged into the thread's (count, mean, M2)
 * in float64 with Chan's formula, then the threads' in a fixed order. Padded rows are never
 * read; the elementwise passes write them 0. Columns vectorize (`omp simd`). */
#define MROWS_BLOCK_BYTES (64 << 10)

INLINE int64_t mrows_block(int64_t C, int dt) {
    int64_t R = MROWS_BLOCK_BYTES / (C * elem_size(dt));
    return R < 1 ? 1 : (R > MAX_BLOCK_ROWS ? MAX_BLOCK_ROWS : R);
}

/* This thread's rows: *tn real rows with mean tmean and M2 tm2 per column (float64 (C,)). fs:
 * 3*C floats of scratch. */
INLINE void mrows_stats_thread(const void *x, const uint8_t *mask, int64_t A, int64_t C, int dt, float *fs,
                               double *tn, double *tmean, double *tm2, int t, int T) {
    int64_t lo, hi;
    part(A, t, T, &lo, &hi);
    const int64_t R = mrows_block(C, dt);
    float *x0 = fs, *dm = fs + C, *q = fs + 2 * C;
    *tn = 0.0;
    for (int64_t c = 0; c < C; c++) tmean[c] = tm2[c] = 0.0;
    for (int64_t b0 = lo; b0 < hi; b0 += R) {
        const int64_t b1 = b0 + R < hi ? b0 + R : hi;
        int64_t first = b0, n = 0;
        while (first < b1 && !mask[first]) first++;
        if (first == b1) continue;
        for (int64_t c = 0; c < C; c++) {
            x0[c] = LD(x, first * C + c, dt);
            dm[c] = q[c] = 0.f;
        }
        for (int64_t r = first; r < b1; r++) {
            if (!mask[r]) continue;
            n++;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) dm[c] += LD(x, r * C + c, dt) - x0[c];
        }
        for (int64_t c = 0; c < C; c++) dm[c] /= (float)n;
        for (int64_t r = first; r < b1; r++) {
            if (!mask[r]) continue;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                const float d = (LD(x, r * C + c, dt) - x0[c]) - dm[c];
                q[c] += d * d;
            }
        }
        const double nb = (double)n, na = *tn, nn = na + nb, f1 = nb / nn, f2 = na * nb / nn;
        for (int64_t c = 0; c < C; c++) {
            const double mb = (double)x0[c] + (double)dm[c];
            if (na == 0.0) {
                tmean[c] = mb;
                tm2[c] = (double)q[c];
            } else {
                const double d = mb - tmean[c];
                tmean[c] += d * f1;
                tm2[c] += (double)q[c] + d * d * f2;
            }
        }
        *tn = nn;
    }
}

/* This thread's rows: sum(dy) and sum(dy * (x - mu)) per column over its real rows (float32 per
 * block, float64 across blocks) into ts1, ts2 (float64 (C,)); fs: 2*C floats of scratch. */
INLINE void mrows_grad_thread(const void *dy, const void *x, const uint8_t *mask, const float *mu, int64_t A,
                              int64_t C, int dt, float *fs, double *ts1, double *ts2, int t, int T) {
    int64_t lo, hi;
    part(A, t, T, &lo, &hi);
    const int64_t R = mrows_block(C, dt);
    float *a1 = fs, *a2 = fs + C;
    for (int64_t c = 0; c < C; c++) ts1[c] = ts2[c] = 0.0;
    for (int64_t b0 = lo; b0 < hi; b0 += R) {
        const int64_t b1 = b0 + R < hi ? b0 + R : hi;
        for (int64_t c = 0; c < C; c++) a1[c] = a2[c] = 0.f;
        for (int64_t r = b0; r < b1; r++) {
            if (!mask[r]) continue;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                const float g = LD(dy, r * C + c, dt);
                a1[c] += g;
                a2[c] += g * (LD(x, r * C + c, dt) - mu[c]);
            }
        }
        for (int64_t c = 0; c < C; c++) {
            ts1[c] += (double)a1[c];
            ts2[c] += (double)a2[c];
        }
    }
}

/* The elementwise pass (APPLY or DX, op1) over this thread's rows: real rows computed, padded
 * rows 0. */
INLINE void mrows_elementwise(int op, const void *x, const void *dy, const uint8_t *mask, void *out, int64_t A,
                              int64_t C, const float *m, const float *s, const float *b, const float *h, int dt, int t,
                              int T) {
    int64_t lo, hi;
    part(A, t, T, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        const int64_t o = r * C;
        if (!mask[r]) {
            memset((char *)out + o * elem_size(dt), 0, (size_t)(C * elem_size(dt)));
            continue;
        }
#pragma omp simd
        for (int64_t c = 0; c < C; c++)
            ST(out, o + c, op1(op, x, dy, o + c, m[c], s[c], op == OP_DX ? b[c] : 0.f, h[c], dt), dt);
    }
}

INLINE void mrows_fwd_body(int dt, const void *x, const uint8_t *mask, void *y, int64_t A, int64_t C, const float *w,
                           const float *b, double eps, float *mean_out, float *var_out, float *fs, double *ds,
                           float *coef) {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    double *tn = ds, *tmean = ds + T + 2 * C * t, *tm2 = tmean + C, *cmean = ds + T + 2 * C * T, *cm2 = cmean + C;
    mrows_stats_thread(x, mask, A, C, dt, fs + 3 * C * t, &tn[t], tmean, tm2, t, T);
#pragma omp barrier
    int64_t c0, c1;
    part(C, t, T, &c0, &c1);
    double m = 0.0;
    for (int u = 0; u < T; u++) m += tn[u];
    for (int64_t c = c0; c < c1; c++) { /* the threads' moments, in order */
        double na = 0.0, ma = 0.0, qa = 0.0;
        for (int u = 0; u < T; u++) {
            const double *mu = ds + T + 2 * C * u;
            if (tn[u] == 0.0) continue;
            if (na == 0.0) {
                na = tn[u];
                ma = mu[c];
                qa = mu[C + c];
            } else {
                chan(&na, &ma, &qa, tn[u], mu[c], mu[C + c]);
            }
        }
        cmean[c] = ma;
        cm2[c] = qa;
    }
    fwd_coeffs(c0, c1, cmean, cm2, m > 0.0 ? m : 1.0, w, b, eps, mean_out, var_out, coef, coef + C, coef + 2 * C);
#pragma omp barrier
    mrows_elementwise(OP_APPLY, x, NULL, mask, y, A, C, coef, coef + C, NULL, coef + 2 * C, dt, t, T);
}

INLINE void mrows_bwd_body(int dt, const void *dy, const void *x, const uint8_t *mask, void *dx, int64_t A, int64_t C,
                           const float *w, const float *mean, const float *invstd, float *s1_out, float *s2_out,
                           float *fs, double *ds, float *coef) {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    mrows_grad_thread(dy, x, mask, mean, A, C, dt, fs + 2 * C * t, ds + 2 * C * t, ds + 2 * C * t + C, t, T);
#pragma omp barrier
    int64_t c0, c1;
    part(C, t, T, &c0, &c1);
    double m = 0.0;
    for (int64_t r = 0; r < A; r++) m += mask[r] != 0;
    for (int64_t c = c0; c < c1; c++) {
        double s1 = 0.0, s2 = 0.0;
        for (int u = 0; u < T; u++) {
            s1 += ds[2 * C * u + c];
            s2 += ds[2 * C * u + C + c];
        }
        bwd_coeffs(c, s1, s2, m > 0.0 ? m : 1.0, w, invstd, s1_out, s2_out, coef, coef + C, coef + 2 * C);
    }
    if (!dx) return;
#pragma omp barrier
    mrows_elementwise(OP_DX, x, dy, mask, dx, A, C, mean, coef, coef + C, coef + 2 * C, dt, t, T);
}

static int masked_rows_forward(int dt, const void *x, const uint8_t *mask, void *y, int64_t A, int64_t C,
                               const float *w, const float *b, double eps, float *mean_out, float *var_out,
                               int nthreads) {
    const int nt = threads_for(A * C, nthreads);
    float *fs = malloc(sizeof(float) * (3 * C * nt + 3 * C));
    double *ds = malloc(sizeof(double) * (nt + 2 * C * nt + 2 * C));
    if (!fs || !ds) { free(fs); free(ds); return 1; }
#pragma omp parallel num_threads(nt)
    {
        float *coef = fs + 3 * C * nt;
        if (dt == DT_F32)
            mrows_fwd_body(DT_F32, x, mask, y, A, C, w, b, eps, mean_out, var_out, fs, ds, coef);
        else
            mrows_fwd_body(DT_BF16, x, mask, y, A, C, w, b, eps, mean_out, var_out, fs, ds, coef);
    }
    free(fs);
    free(ds);
    return 0;
}

static int masked_rows_backward(int dt, const void *dy, const void *x, const uint8_t *mask, void *dx, int64_t A,
                                int64_t C, const float *w, const float *mean, const float *invstd, float *s1_out,
                                float *s2_out, int nthreads) {
    const int nt = threads_for(A * C, nthreads);
    float *fs = malloc(sizeof(float) * (2 * C * nt + 3 * C));
    double *ds = malloc(sizeof(double) * 2 * C * nt);
    if (!fs || !ds) { free(fs); free(ds); return 1; }
#pragma omp parallel num_threads(nt)
    {
        float *coef = fs + 2 * C * nt;
        if (dt == DT_F32)
            mrows_bwd_body(DT_F32, dy, x, mask, dx, A, C, w, mean, invstd, s1_out, s2_out, fs, ds, coef);
        else
            mrows_bwd_body(DT_BF16, dy, x, mask, dx, A, C, w, mean, invstd, s1_out, s2_out, fs, ds, coef);
    }
    free(fs);
    free(ds);
    return 0;
}

/* Training forward over the real values (see the section's comment): y, and the float32 (C,)
 * mean, biased var and invstd of the real values; no real value at all: mean 0, var 0 and y 0.
 * No running statistics (the caller updates them from mean and var). */
int bn_masked_forward(int dt, const void *x, const uint8_t *mask, void *y, int64_t A, int64_t C, int64_t B,
                      const float *w, const float *b, double eps, float *mean_out, float *var_out, float *invstd_out,
                      int nthreads) {
    int64_t nch, L, E = A * C * B;
    if (B == 1) { /* rows */
        advise_huge(y, E * elem_size(dt));
        const int rc = masked_rows_forward(dt, x, mask, y, A, C, w, b, eps, mean_out, var_out, nthreads);
        return rc ? rc : finish_forward(C, 0.0, eps, mean_out, var_out, invstd_out, NULL, NULL, 0.0);
    }
    plane_chunks(B, dt, &nch, &L);
    const int64_t U = A * nch, nt = threads_for(E, nthreads);
    double *r = malloc(sizeof(double) * (U + 2 * U * C + 2 * C));
    float *coef = malloc(sizeof(float) * 3 * C);
    if (!r || !coef) { free(r); free(coef); return 1; }
    advise_huge(y, E * elem_size(dt));
#pragma omp parallel num_threads(nt)
    {
        double *cnt = r, *r1 = r + U, *r2 = r1 + U * C, *cmean = r2 + U * C, *cm2 = cmean + C;
        if (dt == DT_F32)
            mfwd_body(DT_F32, x, mask, y, A, C, B, w, b, eps, mean_out, var_out, cnt, r1, r2, cmean, cm2, coef);
        else
            mfwd_body(DT_BF16, x, mask, y, A, C, B, w, b, eps, mean_out, var_out, cnt, r1, r2, cmean, cm2, coef);
    }
    free(r);
    free(coef);
    return finish_forward(C, 0.0, eps, mean_out, var_out, invstd_out, NULL, NULL, 0.0);
}

INLINE void mbwd_body(int dt, const void *dy, const void *x, const uint8_t *mask, void *dx, int64_t A, int64_t C,
                      int64_t B, const float *w, const float *mean, const float *invstd, float *s1_out,
                      float *s2_out, double *cnt, double *r1, double *r2, float *coef) {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int64_t nch, L, c0, c1;
    plane_chunks(B, dt, &nch, &L);
    mplanes_reduce(x, dy, mask, mean, A, C, B, nch, L, cnt, 1, dt, r1, r2, t, T);
    const double m = mask_total(cnt, A * nch);
    part(C, t, T, &c0, &c1);
    for (int64_t c = c0; c < c1; c++) {
        double s1 = 0.0, s2 = 0.0;
        for (int64_t u = 0; u < A * nch; u++) {
            s1 += r1[u * C + c];
            s2 += r2[u * C + c];
        }
        bwd_coeffs(c, s1, s2, m > 0.0 ? m : 1.0, w, invstd, s1_out, s2_out, coef, coef + C, coef + 2 * C);
    }
    if (!dx) return;
#pragma omp barrier
    mplanes_elementwise(OP_DX, x, dy, mask, dx, A, C, B, mean, coef, coef + C, coef + 2 * C, dt, t, T);
}

/* The backward of bn_masked_forward: s1 = sum(dy), s2 = sum(dy * (x - mean)) over the real values
 * (float32 (C,)) and, if dx is not NULL, dx as bn_train_backward's with m = the real count, 0 at
 * the padding. */
int bn_masked_backward(int dt, const void *dy, const void *x, const uint8_t *mask, void *dx, int64_t A, int64_t C,
                       int64_t B, const float *w, const float *mean, const float *invstd, float *s1_out,
                       float *s2_out, int nthreads) {
    int64_t nch, L, E = A * C * B;
    if (B == 1) { /* rows */
        advise_huge(dx, E * elem_size(dt));
        return masked_rows_backward(dt, dy, x, mask, dx, A, C, w, mean, invstd, s1_out, s2_out, nthreads);
    }
    plane_chunks(B, dt, &nch, &L);
    const int64_t U = A * nch, nt = threads_for(E, nthreads);
    double *r = malloc(sizeof(double) * (U + 2 * U * C));
    float *coef = malloc(sizeof(float) * 3 * C);
    if (!r || !coef) { free(r); free(coef); return 1; }
    advise_huge(dx, E * elem_size(dt));
#pragma omp parallel num_threads(nt)
    {
        double *cnt = r, *r1 = r + U, *r2 = r1 + U * C;
        if (dt == DT_F32)
            mbwd_body(DT_F32, dy, x, mask, dx, A, C, B, w, mean, invstd, s1_out, s2_out, cnt, r1, r2, coef);
        else
            mbwd_body(DT_BF16, dy, x, mask, dx, A, C, B, w, mean, invstd, s1_out, s2_out, cnt, r1, r2, coef);
    }
    free(r);
    free(coef);
    return 0;
}

/* y = x * s + h per column of the rows [lo, hi) of the (A, C) matrix whose mask byte is set; the
 * other rows 0 (channels-last layouts: one mask element per row). */
INLINE void mrows_apply(const void *x, const uint8_t *mask, void *y, int64_t C, const float *s, const float *h, int dt,
                        int t, int T, int64_t A) {
    int64_t lo, hi;
    part(A, t, T, &lo, &hi);
    for (int64_t a = lo; a < hi; a++) {
        const int64_t o = a * C;
        if (mask[a]) {
#pragma omp simd
            for (int64_t c = 0; c < C; c++) ST(y, o + c, LD(x, o + c, dt) * s[c] + h[c], dt);
        } else {
            memset((char *)y + o * elem_size(dt), 0, (size_t)(C * elem_size(dt)));
        }
    }
}

/* Eval-mode BN (as bn_eval) with the mask: 0 at the padding. B == 1 (channels last): one mask
 * byte per row of C values; else per plane position (see the section's comment). */
int bn_masked_eval(int dt, const void *x, const uint8_t *mask, void *y, int64_t A, int64_t C, int64_t B,
                   const float *mean, const float *var, const float *w, const float *b, double eps, int nthreads) {
    float *coef = calloc(3 * (size_t)C, sizeof(float)); /* centre 0, scale, shift */
    if (!coef) return 1;
    BY_WEIGHT_BIAS(w, b, eval_coeffs, C, mean, var, w, b, eps, coef + C, coef + 2 * C);
    advise_huge(y, A * C * B * elem_size(dt));
#pragma omp parallel num_threads(threads_for(A * C * B, nthreads))
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        if (B == 1 && dt == DT_F32)
            mrows_apply(x, mask, y, C, coef + C, coef + 2 * C, DT_F32, t, T, A);
        else if (B == 1)
            mrows_apply(x, mask, y, C, coef + C, coef + 2 * C, DT_BF16, t, T, A);
        else if (dt == DT_F32)
            mplanes_elementwise(OP_APPLY, x, NULL, mask, y, A, C, B, coef, coef + C, NULL, coef + 2 * C, DT_F32, t, T);
        else
            mplanes_elementwise(OP_APPLY, x, NULL, mask, y, A, C, B, coef, coef + C, NULL, coef + 2 * C, DT_BF16, t,
                                T);
    }
    free(coef);
    return 0;
}
