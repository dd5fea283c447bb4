/*
 * bconv.c: the native binary (1-bit) 2-D convolution behind binarize's PackedBinaryConv2d.
 *
 * Plain C11 with no Python or torch headers and no OpenMP; the Python wrapper
 * (binarize/runtime/kernel.py) loads it with ctypes and passes raw pointers. One build holds several
 * instruction-set variants, each function marked with __attribute__((target(...))); the variant is
 * chosen at run time and never run on a CPU that lacks it (bconv_cpu_paths).
 *
 *   path 0 "scalar"    64-bit words, __builtin_popcountll (target "popcnt" on x86)
 *   path 1 "avx2"      256-bit vectors, nibble-lookup popcount (vpshufb; Mula, Kurz, Lemire 2016)
 *   path 2 "avx512bw"  512-bit vectors, nibble-lookup popcount
 *   path 3 "vpopcntdq" 512-bit vectors, vpopcntq
 *
 * What one call computes, for float32 NHWC input x [N,H,W,C], optional per-channel bias beta [C]:
 *
 *   bit(n,y,x,c) = (x[n,y,x,c] + beta[c]) < 0      (1 means -1; so 0, -0.0 and NaN give +1)
 *   acc(n,oy,ox,o) = sum over the taps inside the input and over c of (+-1 activation) * (+-1 weight)
 *   out[n,oy,ox,o] = (float)acc * mul[o] + add[o]  (two roundings: build with -ffp-contract=off)
 *
 * i.e. zero padding: a tap outside the input contributes 0. The accumulation is an integer, so the
 * result is bitwise the same for every path, thread count and work split.
 *
 * How: (1) sign + bit packing of every input pixel into cb = ceil(C/8) bytes, LSB first; (2) for a
 * block of output pixels, a packed im2col row per pixel: the taps' cb-byte groups one after another
 * (kb = kh*kw*cb bytes), an outside tap as zero bytes (+1), then zero bytes up to a whole number of
 * vectors (kbpad; the weights are padded the same way, so the SIMD loops need no masks or tails);
 * (3) an XOR-popcount GEMM of these rows against the weights (repacked once, bconv_prepare, into
 * panels of NR output channels), tiled MR pixels x NR channels in registers; (4) the output
 * transform with the zero-padding correction: with the outside taps read as +1 the popcount p gives
 * K - 2p, K = kh*kw*C; the true sum is that minus the weight sums of the outside taps, a term that
 * depends only on the output channel and on which taps fall outside (the border class of the row
 * and of the column), tabulated once per call.
 *
 * Threads: a small pthread pool, the count given per call; threads split the pixels (packing) and
 * then the blocks of output pixels. Each worker runs with the caller's MXCSR (flush-to-zero and
 * denormals-are-zero), so every thread compares and adds floats as the calling thread does.
 *
 * Testing the AVX-512 paths on a host without AVX-512: compile with -DBCONV_SIMDE and SIMDe's
 * headers (libsimde-dev) on the include path; the intrinsics are then emulated in portable C and
 * every path is reported as supported.
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BCONV_ABI_VERSION 1 /* bump on any change of the exported functions or of the prepared layout */
#define BCONV_MAGIC 0x42434e56u

#if defined(BCONV_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define BCONV_X86 1
#define BCONV_EMULATED 1
#define TARGET_POPCNT
#define TARGET_AVX2
#define TARGET_AVX512F
#define TARGET_AVX512BW
#define TARGET_VPOPCNTDQ
#elif defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BCONV_X86 1
#define TARGET_POPCNT __attribute__((target("popcnt")))
#define TARGET_AVX2 __attribute__((target("avx2")))
#define TARGET_AVX512F __attribute__((target("avx512f")))
#define TARGET_AVX512BW __attribute__((target("avx512f,avx512bw")))
#define TARGET_VPOPCNTDQ __attribute__((target("avx512f,avx512vpopcntdq")))
#else
#define TARGET_POPCNT
#endif

#define BCONV_EXPORT __attribute__((visibility("default")))

enum { PATH_SCALAR = 0, PATH_AVX2 = 1, PATH_AVX512BW = 2, PATH_VPOPCNTDQ = 3, NPATHS = 4 };

enum { BCONV_OK = 0, BCONV_EINVAL = -1, BCONV_ENOMEM = -2, BCONV_EPATH = -3, BCONV_EPREP = -4 };

/* Vector bytes, nibble split, register tile (MR pixels x NR channels) of each path. */
typedef struct {
    int vb, split, mr, nr;
} geometry;

#define SCALAR_MR 2
#define SCALAR_NR 4
#define AVX2_MR 3
#define AVX2_NR 4
#define AVX512BW_MR 4
#define AVX512BW_NR 4
#define VPOPCNTDQ_MR 4
#define VPOPCNTDQ_NR 4
#define MAX_MR 4
#define MAX_NR 4

static const geometry GEOMETRY[NPATHS] = {
    {8, 0, SCALAR_MR, SCALAR_NR},
    {32, 1, AVX2_MR, AVX2_NR},
    {64, 1, AVX512BW_MR, AVX512BW_NR},
    {64, 0, VPOPCNTDQ_MR, VPOPCNTDQ_NR},
};

/* A byte of per-lane popcounts grows by at most 8 per vector step: flush to wider sums every 31. */
#define NIBBLE_CHUNK 31
/* The direct kernel sums a whole pixel in bytes: at most 31 taps. */
#define DIRECT_MAX_TAPS 31

/* Header of the prepared weights; the int32 weight sums and the panels follow at their offsets. */
typedef struct {
    uint32_t magic;
    int32_t abi, path, out_channels, kh, kw, in_channels;
    int32_t cb;    /* bytes of one tap: ceil(C / 8) */
    int32_t kb;    /* bytes of one im2col row: kh * kw * cb */
    int32_t kbpad; /* kb rounded up to whole vectors */
    int32_t nv;    /* kbpad / vb */
    int32_t opad;  /* out_channels rounded up to whole panels of NR */
    int32_t direct; /* 1: the direct kernel for narrow inputs (below), 0: im2col + GEMM */
    int32_t ab;     /* bytes of one packed input pixel: cb, or the direct kernel's lane width */
    int32_t groups; /* direct kernel: vectors of output channels */
    int64_t off_wsum, off_panels, total;
} prepared;

#define ALIGN 64
#define ROUND_UP(a, b) ((((a) + (b)-1) / (b)) * (b))

/* ------------------------------------------------------------------------------------------------ */
/* CPU features                                                                                      */

static int cpu_paths(void) {
#if defined(BCONV_EMULATED)
    return (1 << NPATHS) - 1;
#elif defined(BCONV_X86)
    int mask = 0;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("popcnt")) mask |= 1 << PATH_SCALAR;
    if (__builtin_cpu_supports("avx2")) mask |= 1 << PATH_AVX2;
    /* the AVX-512 paths also run the AVX2 direct kernel (every AVX-512 CPU has AVX2; checked all the same) */
    int avx512 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avx512f");
    if (avx512 && __builtin_cpu_supports("avx512bw")) mask |= 1 << PATH_AVX512BW;
    if (avx512 && __builtin_cpu_supports("avx512vpopcntdq")) mask |= 1 << PATH_VPOPCNTDQ;
    return mask;
#else
    return 1 << PATH_SCALAR;
#endif
}

static int compiled_paths(void) {
#if defined(BCONV_X86)
    return (1 << NPATHS) - 1;
#else
    return 1 << PATH_SCALAR;
#endif
}

/* ------------------------------------------------------------------------------------------------ */
/* Thread pool                                                                                       */

typedef void (*task_fn)(void *ctx, int tid, int nthreads);

#define MAX_THREADS 256

static struct {
    pthread_mutex_t busy; /* held by the call that uses the pool */
    pthread_mutex_t mutex;
    pthread_cond_t start, done;
    int workers;        /* threads started */
    unsigned long generation;
    unsigned long born[MAX_THREADS]; /* the generation each worker was started in */
    task_fn fn;
    void *ctx;
    int active;         /* threads taking part in the current task, caller included */
    int remaining;      /* workers of the current task not finished yet */
    unsigned int mxcsr; /* the caller's */
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER,
            .mutex = PTHREAD_MUTEX_INITIALIZER,
            .start = PTHREAD_COND_INITIALIZER,
            .done = PTHREAD_COND_INITIALIZER};

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static unsigned int get_fp_state(void) {
#if defined(BCONV_X86) && !defined(BCONV_EMULATED)
    return _mm_getcsr();
#else
    return 0;
#endif
}

static void set_fp_state(unsigned int state) {
#if defined(BCONV_X86) && !defined(BCONV_EMULATED)
    _mm_setcsr(state);
#else
    (void)state;
#endif
}

static void *worker_main(void *arg) {
    int tid = (int)(intptr_t)arg;
    pthread_mutex_lock(&pool.mutex);
    unsigned long seen = pool.born[tid];
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.start, &pool.mutex);
        seen = pool.generation;
        if (tid >= pool.active) continue;
        task_fn fn = pool.fn;
        void *ctx = pool.ctx;
        int active = pool.active;
        unsigned int mxcsr = pool.mxcsr;
        pthread_mutex_unlock(&pool.mutex);
        set_fp_state(mxcsr);
        fn(ctx, tid, active);
        pthread_mutex_lock(&pool.mutex);
        if (--pool.remaining == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

static void pool_prepare_fork(void) { pthread_mutex_lock(&pool.busy); }
static void pool_parent_fork(void) { pthread_mutex_unlock(&pool.busy); }

/* The child of a fork has none of the workers: start again from an empty pool. */
static void pool_child_fork(void) {
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.mutex, NULL);
    pthread_cond_init(&pool.start, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.workers = 0;
    pool.generation = 0;
    pool.active = 0;
    pool.remaining = 0;
}

static void pool_init(void) { pthread_atfork(pool_prepare_fork, pool_parent_fork, pool_child_fork); }

/* Runs fn(ctx, tid, n) for tid in [0, n), n <= nthreads; the caller is tid 0. */
static void run_parallel(task_fn fn, void *ctx, int nthreads) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_once(&pool_once, pool_init);
    if (pthread_mutex_trylock(&pool.busy) != 0) { /* another call holds the pool: run on this thread */
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&pool.mutex);
    while (pool.workers < nthreads - 1) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pool.born[pool.workers + 1] = pool.generation;
        int failed = pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)(pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.workers++;
    }
    int active = pool.workers + 1 < nthreads ? pool.workers + 1 : nthreads;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.active = active;
    pool.remaining = active - 1;
    pool.mxcsr = get_fp_state();
    pool.generation++;
    pthread_cond_broadcast(&pool.start);
    pthread_mutex_unlock(&pool.mutex);
    fn(ctx, 0, active);
    pthread_mutex_lock(&pool.mutex);
    while (pool.remaining > 0) pthread_cond_wait(&pool.done, &pool.mutex);
    pthread_mutex_unlock(&pool.mutex);
    pthread_mutex_unlock(&pool.busy);
}

/* ------------------------------------------------------------------------------------------------ */
/* The call's state                                                                                  */

typedef struct {
    const prepared *prep;
    const uint8_t *panels;
    const float *x, *beta, *mul, *add;
    float *out;
    int n, h, w, c, oh, ow, sh, sw, ph, pw, dh, dw;
    int64_t pixels;  /* n * h * w */
    int64_t outputs; /* n * oh * ow */
    uint8_t *act;    /* packed input pixels [pixels][cb] */
    const int32_t *corr;  /* [row classes][column classes][out_channels], NULL when nothing falls outside */
    const int32_t *row_class, *col_class;
    int col_classes;
    int block;       /* output pixels per block, a multiple of MR */
    int64_t blocks;
    atomic_int status;
} job;

/* ------------------------------------------------------------------------------------------------ */
/* Sign and bit packing                                                                              */

static inline void pack_tail(const float *x, const float *beta, int c0, int c, uint8_t *dst) {
    for (int b = c0 / 8; b * 8 < c; b++) {
        unsigned bits = 0;
        for (int i = 0; i < 8 && b * 8 + i < c; i++) {
            float v = x[b * 8 + i];
            if (beta) v = v + beta[b * 8 + i];
            bits |= (unsigned)(v < 0.0f) << i;
        }
        dst[b] = (uint8_t)bits;
    }
}

/* Zero bytes past the channels, up to the pixel stride ab. */
static inline void pack_pad(uint8_t *dst, int cb, int ab) {
    for (int b = cb; b < ab; b++) dst[b] = 0;
}

static void pack_scalar(const float *x, const float *beta, int64_t count, int c, int cb, int ab, uint8_t *dst) {
    for (int64_t p = 0; p < count; p++) {
        pack_tail(x + p * c, beta, 0, c, dst + p * ab);
        pack_pad(dst + p * ab, cb, ab);
    }
}

#if defined(BCONV_X86)
TARGET_AVX2 static void pack_avx2(const float *x, const float *beta, int64_t count, int c, int cb, int ab,
                                  uint8_t *dst) {
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t p = 0; p < count; p++) {
        const float *xp = x + p * c;
        uint8_t *d = dst + p * ab;
        int i = 0;
        for (; i + 8 <= c; i += 8) {
            __m256 v = _mm256_loadu_ps(xp + i);
            if (beta) v = _mm256_add_ps(v, _mm256_loadu_ps(beta + i));
            d[i / 8] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ));
        }
        pack_tail(xp, beta, i, c, d);
        pack_pad(d, cb, ab);
    }
}

TARGET_AVX512F static void pack_avx512(const float *x, const float *beta, int64_t count, int c, int cb, int ab,
                                       uint8_t *dst) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t p = 0; p < count; p++) {
        const float *xp = x + p * c;
        uint8_t *d = dst + p * ab;
        int i = 0;
        for (; i + 16 <= c; i += 16) {
            __m512 v = _mm512_loadu_ps(xp + i);
            if (beta) v = _mm512_add_ps(v, _mm512_loadu_ps(beta + i));
            unsigned bits = (unsigned)_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ);
            d[i / 8] = (uint8_t)bits;
            d[i / 8 + 1] = (uint8_t)(bits >> 8);
        }
        pack_tail(xp, beta, i, c, d);
        pack_pad(d, cb, ab);
    }
}
#endif

static void pack_task(void *ctx, int tid, int nthreads) {
    job *J = ctx;
    int64_t p0 = J->pixels * tid / nthreads, p1 = J->pixels * (tid + 1) / nthreads;
    if (p0 >= p1) return;
    const float *x = J->x + p0 * J->c;
    const int cb = J->prep->cb, ab = J->prep->ab;
    uint8_t *dst = J->act + p0 * ab;
    switch (J->prep->path) {
#if defined(BCONV_X86)
    case PATH_AVX2: pack_avx2(x, J->beta, p1 - p0, J->c, cb, ab, dst); break;
    case PATH_AVX512BW:
    case PATH_VPOPCNTDQ: pack_avx512(x, J->beta, p1 - p0, J->c, cb, ab, dst); break;
#endif
    default: pack_scalar(x, J->beta, p1 - p0, J->c, cb, ab, dst); break;
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Packed im2col and the output transform (shared by every path)                                    */

static inline void copy_tap(uint8_t *dst, const uint8_t *src, int cb) {
    switch (cb) {
    case 1: dst[0] = src[0]; return;
    case 2: memcpy(dst, src, 2); return;
    case 4: memcpy(dst, src, 4); return;
    case 8: memcpy(dst, src, 8); return;
    default:
        if (cb % 8 == 0) {
            for (int i = 0; i < cb; i += 8) memcpy(dst + i, src + i, 8);
        } else {
            memcpy(dst, src, (size_t)cb);
        }
    }
}

/* rows (>= count, a multiple of MR) im2col rows of kbpad bytes for the output pixels g0, g0 + 1, ... */
static void im2col(const job *J, int64_t g0, int count, int rows, uint8_t *dst, int64_t *class_offset) {
    const prepared *P = J->prep;
    const int cb = P->cb, kw = P->kw, kbpad = P->kbpad;
    const int64_t plane = (int64_t)J->oh * J->ow;
    for (int r = 0; r < rows; r++) {
        uint8_t *row = dst + (size_t)r * kbpad;
        if (r >= count) {
            memset(row, 0, (size_t)kbpad);
            continue;
        }
        int64_t g = g0 + r;
        int64_t n = g / plane;
        int oy = (int)((g % plane) / J->ow), ox = (int)(g % J->ow);
        class_offset[r] = J->corr ? ((int64_t)J->row_class[oy] * J->col_classes + J->col_class[ox]) * P->out_channels
                                  : -1;
        for (int ky = 0; ky < P->kh; ky++) {
            int iy = oy * J->sh - J->ph + ky * J->dh;
            uint8_t *d = row + (size_t)ky * kw * cb;
            if (iy < 0 || iy >= J->h) {
                memset(d, 0, (size_t)kw * cb);
                continue;
            }
            const uint8_t *src = J->act + ((n * J->h + iy) * J->w) * P->ab;
            for (int kx = 0; kx < kw; kx++, d += cb) {
                int ix = ox * J->sw - J->pw + kx * J->dw;
                if (ix < 0 || ix >= J->w)
                    memset(d, 0, (size_t)cb);
                else
                    copy_tap(d, src + (size_t)ix * P->ab, cb);
            }
        }
        memset(row + P->kb, 0, (size_t)(kbpad - P->kb));
    }
}

/* out = (float)acc * mul + add for ni pixels (from row i0 of the block at g0) and nj channels from o0. */
static inline void emit(const job *J, int64_t g0, int i0, int ni, int o0, int nj, const uint32_t *pc, int nr,
                        const int64_t *class_offset) {
    const prepared *P = J->prep;
    const int32_t k = P->kh * P->kw * P->in_channels;
    const int o_count = P->out_channels;
    for (int i = 0; i < ni; i++) {
        float *out = J->out + (g0 + i0 + i) * o_count;
        int64_t off = class_offset[i0 + i];
        const int32_t *corr = off >= 0 ? J->corr + off : NULL;
        for (int j = 0; j < nj; j++) {
            int o = o0 + j;
            int32_t acc = k - 2 * (int32_t)pc[i * nr + j];
            if (corr) acc -= corr[o];
            float scaled = (float)acc * J->mul[o];
            out[o] = scaled + J->add[o];
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* XOR-popcount GEMM, one block of output pixels per call, per path                                  */

TARGET_POPCNT static void block_scalar(const job *J, int64_t g0, int count, const uint8_t *rows, uint8_t *scratch,
                                       const int64_t *class_offset) {
    (void)scratch;
    enum { MR = SCALAR_MR, NR = SCALAR_NR };
    const prepared *P = J->prep;
    const int nv = P->nv, kbpad = P->kbpad;
    const int nrows = ROUND_UP(count, MR);
    for (int o0 = 0; o0 < P->opad; o0 += NR) {
        const uint8_t *wp = J->panels + (size_t)(o0 / NR) * nv * NR * 8;
        int nj = P->out_channels - o0 < NR ? P->out_channels - o0 : NR;
        for (int r0 = 0; r0 < nrows; r0 += MR) {
            uint64_t acc[MR][NR] = {{0}};
            const uint8_t *a = rows + (size_t)r0 * kbpad;
            for (int v = 0; v < nv; v++) {
                uint64_t wv[NR], av[MR];
                memcpy(wv, wp + (size_t)v * NR * 8, sizeof wv);
                for (int i = 0; i < MR; i++) memcpy(&av[i], a + (size_t)i * kbpad + (size_t)v * 8, 8);
                for (int i = 0; i < MR; i++)
                    for (int j = 0; j < NR; j++) acc[i][j] += (uint64_t)__builtin_popcountll(av[i] ^ wv[j]);
            }
            uint32_t pc[MR * NR];
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++) pc[i * NR + j] = (uint32_t)acc[i][j];
            int ni = count - r0 < MR ? count - r0 : MR;
            emit(J, g0, r0, ni, o0, nj, pc, NR, class_offset);
        }
    }
}

#if defined(BCONV_X86)

static inline TARGET_AVX2 uint32_t hsum_sad_avx2(__m256i counts) {
    __m256i s = _mm256_sad_epu8(counts, _mm256_setzero_si256());
    __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi64(t, _mm_unpackhi_epi64(t, t));
    return (uint32_t)_mm_cvtsi128_si32(t);
}

/* Splits each im2col row into its low and high nibbles: row r becomes rows 2r (low) and 2r + 1 (high). */
TARGET_AVX2 static void split_avx2(const uint8_t *rows, int nrows, int kbpad, uint8_t *dst) {
    const __m256i mask = _mm256_set1_epi8(0x0f);
    for (int r = 0; r < nrows; r++) {
        const uint8_t *src = rows + (size_t)r * kbpad;
        uint8_t *lo = dst + (size_t)2 * r * kbpad, *hi = lo + kbpad;
        for (int b = 0; b < kbpad; b += 32) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(src + b));
            _mm256_storeu_si256((__m256i *)(lo + b), _mm256_and_si256(v, mask));
            _mm256_storeu_si256((__m256i *)(hi + b), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
        }
    }
}

TARGET_AVX2 static void block_avx2(const job *J, int64_t g0, int count, const uint8_t *rows, uint8_t *scratch,
                                   const int64_t *class_offset) {
    enum { MR = AVX2_MR, NR = AVX2_NR, VB = 32 };
    const prepared *P = J->prep;
    const int nv = P->nv, kbpad = P->kbpad;
    const int nrows = ROUND_UP(count, MR);
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                         2, 3, 2, 3, 3, 4);
    split_avx2(rows, nrows, kbpad, scratch);
    for (int o0 = 0; o0 < P->opad; o0 += NR) {
        const uint8_t *wp = J->panels + (size_t)(o0 / NR) * nv * NR * 2 * VB;
        int nj = P->out_channels - o0 < NR ? P->out_channels - o0 : NR;
        for (int r0 = 0; r0 < nrows; r0 += MR) {
            const uint8_t *a = scratch + (size_t)2 * r0 * kbpad;
            uint32_t pc[MR * NR] = {0};
            for (int v0 = 0; v0 < nv; v0 += NIBBLE_CHUNK) {
                int v1 = v0 + NIBBLE_CHUNK < nv ? v0 + NIBBLE_CHUNK : nv;
                __m256i acc[MR][NR];
                for (int i = 0; i < MR; i++)
                    for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_si256();
                for (int v = v0; v < v1; v++) {
                    const uint8_t *w = wp + (size_t)v * NR * 2 * VB;
                    for (int i = 0; i < MR; i++) {
                        __m256i lo = _mm256_loadu_si256((const __m256i *)(a + (size_t)2 * i * kbpad + v * VB));
                        __m256i hi = _mm256_loadu_si256((const __m256i *)(a + (size_t)(2 * i + 1) * kbpad + v * VB));
                        for (int j = 0; j < NR; j++) {
                            __m256i wl = _mm256_loadu_si256((const __m256i *)(w + (2 * j) * VB));
                            __m256i wh = _mm256_loadu_si256((const __m256i *)(w + (2 * j + 1) * VB));
                            __m256i cl = _mm256_shuffle_epi8(lut, _mm256_xor_si256(lo, wl));
                            __m256i ch = _mm256_shuffle_epi8(lut, _mm256_xor_si256(hi, wh));
                            acc[i][j] = _mm256_add_epi8(acc[i][j], _mm256_add_epi8(cl, ch));
                        }
                    }
                }
                for (int i = 0; i < MR; i++)
                    for (int j = 0; j < NR; j++) pc[i * NR + j] += hsum_sad_avx2(acc[i][j]);
            }
            int ni = count - r0 < MR ? count - r0 : MR;
            emit(J, g0, r0, ni, o0, nj, pc, NR, class_offset);
        }
    }
}

static inline TARGET_AVX512BW uint32_t hsum_sad_avx512(__m512i counts) {
    uint64_t lanes[8];
    _mm512_storeu_si512((void *)lanes, _mm512_sad_epu8(counts, _mm512_setzero_si512()));
    uint64_t s = 0;
    for (int i = 0; i < 8; i++) s += lanes[i];
    return (uint32_t)s;
}

TARGET_AVX512BW static void split_avx512(const uint8_t *rows, int nrows, int kbpad, uint8_t *dst) {
    const __m512i mask = _mm512_set1_epi8(0x0f);
    for (int r = 0; r < nrows; r++) {
        const uint8_t *src = rows + (size_t)r * kbpad;
        uint8_t *lo = dst + (size_t)2 * r * kbpad, *hi = lo + kbpad;
        for (int b = 0; b < kbpad; b += 64) {
            __m512i v = _mm512_loadu_si512((const void *)(src + b));
            _mm512_storeu_si512((void *)(lo + b), _mm512_and_si512(v, mask));
            _mm512_storeu_si512((void *)(hi + b), _mm512_and_si512(_mm512_srli_epi16(v, 4), mask));
        }
    }
}

TARGET_AVX512BW static void block_avx512bw(const job *J, int64_t g0, int count, const uint8_t *rows,
                                           uint8_t *scratch, const int64_t *class_offset) {
    enum { MR = AVX512BW_MR, NR = AVX512BW_NR, VB = 64 };
    const prepared *P = J->prep;
    const int nv = P->nv, kbpad = P->kbpad;
    const int nrows = ROUND_UP(count, MR);
    const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4));
    split_avx512(rows, nrows, kbpad, scratch);
    for (int o0 = 0; o0 < P->opad; o0 += NR) {
        const uint8_t *wp = J->panels + (size_t)(o0 / NR) * nv * NR * 2 * VB;
        int nj = P->out_channels - o0 < NR ? P->out_channels - o0 : NR;
        for (int r0 = 0; r0 < nrows; r0 += MR) {
            const uint8_t *a = scratch + (size_t)2 * r0 * kbpad;
            uint32_t pc[MR * NR] = {0};
            for (int v0 = 0; v0 < nv; v0 += NIBBLE_CHUNK) {
                int v1 = v0 + NIBBLE_CHUNK < nv ? v0 + NIBBLE_CHUNK : nv;
                __m512i acc[MR][NR];
                for (int i = 0; i < MR; i++)
                    for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_si512();
                for (int v = v0; v < v1; v++) {
                    const uint8_t *w = wp + (size_t)v * NR * 2 * VB;
                    for (int i = 0; i < MR; i++) {
                        __m512i lo = _mm512_loadu_si512((const void *)(a + (size_t)2 * i * kbpad + v * VB));
                        __m512i hi = _mm512_loadu_si512((const void *)(a + (size_t)(2 * i + 1) * kbpad + v * VB));
                        for (int j = 0; j < NR; j++) {
                            __m512i wl = _mm512_loadu_si512((const void *)(w + (2 * j) * VB));
                            __m512i wh = _mm512_loadu_si512((const void *)(w + (2 * j + 1) * VB));
                            __m512i cl = _mm512_shuffle_epi8(lut, _mm512_xor_si512(lo, wl));
                            __m512i ch = _mm512_shuffle_epi8(lut, _mm512_xor_si512(hi, wh));
                            acc[i][j] = _mm512_add_epi8(acc[i][j], _mm512_add_epi8(cl, ch));
                        }
                    }
                }
                for (int i = 0; i < MR; i++)
                    for (int j = 0; j < NR; j++) pc[i * NR + j] += hsum_sad_avx512(acc[i][j]);
            }
            int ni = count - r0 < MR ? count - r0 : MR;
            emit(J, g0, r0, ni, o0, nj, pc, NR, class_offset);
        }
    }
}

static inline TARGET_VPOPCNTDQ uint32_t hsum_epi64_avx512(__m512i sums) {
    uint64_t lanes[8];
    _mm512_storeu_si512((void *)lanes, sums);
    uint64_t s = 0;
    for (int i = 0; i < 8; i++) s += lanes[i];
    return (uint32_t)s;
}

TARGET_VPOPCNTDQ static void block_vpopcntdq(const job *J, int64_t g0, int count, const uint8_t *rows,
                                             uint8_t *scratch, const int64_t *class_offset) {
    (void)scratch;
    enum { MR = VPOPCNTDQ_MR, NR = VPOPCNTDQ_NR, VB = 64 };
    const prepared *P = J->prep;
    const int nv = P->nv, kbpad = P->kbpad;
    const int nrows = ROUND_UP(count, MR);
    for (int o0 = 0; o0 < P->opad; o0 += NR) {
        const uint8_t *wp = J->panels + (size_t)(o0 / NR) * nv * NR * VB;
        int nj = P->out_channels - o0 < NR ? P->out_channels - o0 : NR;
        for (int r0 = 0; r0 < nrows; r0 += MR) {
            const uint8_t *a = rows + (size_t)r0 * kbpad;
            __m512i acc[MR][NR];
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_si512();
            for (int v = 0; v < nv; v++) {
                const uint8_t *w = wp + (size_t)v * NR * VB;
                for (int i = 0; i < MR; i++) {
                    __m512i av = _mm512_loadu_si512((const void *)(a + (size_t)i * kbpad + v * VB));
                    for (int j = 0; j < NR; j++) {
                        __m512i wv = _mm512_loadu_si512((const void *)(w + j * VB));
                        acc[i][j] = _mm512_add_epi64(acc[i][j], _mm512_popcnt_epi64(_mm512_xor_si512(av, wv)));
                    }
                }
            }
            uint32_t pc[MR * NR];
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++) pc[i * NR + j] = hsum_epi64_avx512(acc[i][j]);
            int ni = count - r0 < MR ? count - r0 : MR;
            emit(J, g0, r0, ni, o0, nj, pc, NR, class_offset);
        }
    }
}

#endif /* BCONV_X86 */

/* ------------------------------------------------------------------------------------------------ */
/* Direct kernel for narrow inputs (C <= 64, at most 31 taps; every x86 vector path, in AVX2)      */
/*                                                                                                  */
/* A tap's bits fit in one lane of lb = 1, 2, 4 or 8 bytes, so the vector runs over output channels */
/* (32 / lb of them) rather than over the reduction: the tap's activation bits are broadcast to     */
/* every lane and XORed with the lanes' weights. Taps outside the input are skipped, so the sum of  */
/* the inside taps, (inside taps * C) - 2 * popcount, needs no padding correction and no im2col.    */

#if defined(BCONV_X86)
static inline TARGET_AVX2 __m256i broadcast_lane(const uint8_t *src, int lb) {
    switch (lb) {
    case 1: return _mm256_set1_epi8((char)src[0]);
    case 2: {
        uint16_t v;
        memcpy(&v, src, 2);
        return _mm256_set1_epi16((short)v);
    }
    case 4: {
        uint32_t v;
        memcpy(&v, src, 4);
        return _mm256_set1_epi32((int)v);
    }
    default: {
        uint64_t v;
        memcpy(&v, src, 8);
        return _mm256_set1_epi64x((long long)v);
    }
    }
}

/* Popcounts of gb groups (32 / lb channels each, from group g0) over the taps, stored as int32 in pc. */
static inline __attribute__((always_inline)) TARGET_AVX2 void direct_groups(const uint8_t *const *src,
                                                                           const int *tap, int taps,
                                                                           const uint8_t *weights, int groups,
                                                                           int g0, int gb, int lb, int32_t *pc) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                         2, 3, 2, 3, 3, 4);
    const __m256i mask = _mm256_set1_epi8(0x0f);
    __m256i acc[8];
    for (int j = 0; j < gb; j++) acc[j] = _mm256_setzero_si256();
    for (int t = 0; t < taps; t++) {
        __m256i a = broadcast_lane(src[t], lb);
        __m256i lo = _mm256_and_si256(a, mask), hi = _mm256_and_si256(_mm256_srli_epi16(a, 4), mask);
        const uint8_t *w = weights + ((size_t)tap[t] * groups + g0) * 64;
        for (int j = 0; j < gb; j++) {
            __m256i wl = _mm256_loadu_si256((const __m256i *)(w + j * 64));
            __m256i wh = _mm256_loadu_si256((const __m256i *)(w + j * 64 + 32));
            __m256i cl = _mm256_shuffle_epi8(lut, _mm256_xor_si256(lo, wl));
            __m256i ch = _mm256_shuffle_epi8(lut, _mm256_xor_si256(hi, wh));
            acc[j] = _mm256_add_epi8(acc[j], _mm256_add_epi8(cl, ch));
        }
    }
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int j = 0; j < gb; j++) {
        int32_t *d = pc + (size_t)(g0 + j) * (32 / lb);
        switch (lb) {
        case 1:
            for (int q = 0; q < 4; q++) {
                __m128i bytes = q < 2 ? _mm256_castsi256_si128(acc[j]) : _mm256_extracti128_si256(acc[j], 1);
                if (q & 1) bytes = _mm_srli_si128(bytes, 8);
                _mm256_storeu_si256((__m256i *)(d + 8 * q), _mm256_cvtepu8_epi32(bytes));
            }
            break;
        case 2: {
            __m256i s16 = _mm256_maddubs_epi16(acc[j], ones8);
            _mm256_storeu_si256((__m256i *)d, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16)));
            _mm256_storeu_si256((__m256i *)(d + 8), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16, 1)));
            break;
        }
        case 4:
            _mm256_storeu_si256((__m256i *)d, _mm256_madd_epi16(_mm256_maddubs_epi16(acc[j], ones8), ones16));
            break;
        default: {
            uint64_t s64[4];
            _mm256_storeu_si256((__m256i *)s64, _mm256_sad_epu8(acc[j], _mm256_setzero_si256()));
            for (int q = 0; q < 4; q++) d[q] = (int32_t)s64[q];
        }
        }
    }
}

static inline __attribute__((always_inline)) TARGET_AVX2 void direct_pixels(job *J, int64_t g0, int64_t g1, int lb,
                                                                           int32_t *pc) {
    const prepared *P = J->prep;
    const int groups = P->groups, o_count = P->out_channels;
    const int64_t plane = (int64_t)J->oh * J->ow;
    const uint8_t *src[DIRECT_MAX_TAPS];
    int tap[DIRECT_MAX_TAPS];
    for (int64_t g = g0; g < g1; g++) {
        int64_t n = g / plane;
        int oy = (int)((g % plane) / J->ow), ox = (int)(g % J->ow);
        int taps = 0;
        for (int ky = 0; ky < P->kh; ky++) {
            int iy = oy * J->sh - J->ph + ky * J->dh;
            if (iy < 0 || iy >= J->h) continue;
            for (int kx = 0; kx < P->kw; kx++) {
                int ix = ox * J->sw - J->pw + kx * J->dw;
                if (ix < 0 || ix >= J->w) continue;
                src[taps] = J->act + ((n * J->h + iy) * J->w + ix) * P->ab;
                tap[taps++] = ky * P->kw + kx;
            }
        }
        int q = 0;
        for (; q + 8 <= groups; q += 8) direct_groups(src, tap, taps, J->panels, groups, q, 8, lb, pc);
        if (q + 4 <= groups) {
            direct_groups(src, tap, taps, J->panels, groups, q, 4, lb, pc);
            q += 4;
        }
        if (q + 2 <= groups) {
            direct_groups(src, tap, taps, J->panels, groups, q, 2, lb, pc);
            q += 2;
        }
        if (q < groups) direct_groups(src, tap, taps, J->panels, groups, q, 1, lb, pc);
        /* out = (float)(inside * C - 2 * popcount) * mul + add, 8 channels at a time */
        const __m256i k = _mm256_set1_epi32(taps * P->in_channels);
        float *out = J->out + g * o_count;
        int o = 0;
        for (; o + 8 <= o_count; o += 8) {
            __m256i p = _mm256_loadu_si256((const __m256i *)(pc + o));
            __m256 acc = _mm256_cvtepi32_ps(_mm256_sub_epi32(k, _mm256_add_epi32(p, p)));
            __m256 scaled = _mm256_mul_ps(acc, _mm256_loadu_ps(J->mul + o));
            _mm256_storeu_ps(out + o, _mm256_add_ps(scaled, _mm256_loadu_ps(J->add + o)));
        }
        for (; o < o_count; o++) {
            float scaled = (float)(taps * P->in_channels - 2 * pc[o]) * J->mul[o];
            out[o] = scaled + J->add[o];
        }
    }
}

TARGET_AVX2 static void direct_task(void *ctx, int tid, int nthreads) {
    job *J = ctx;
    int64_t g0 = J->outputs * tid / nthreads, g1 = J->outputs * (tid + 1) / nthreads;
    if (g0 >= g1) return;
    const prepared *P = J->prep;
    int32_t *pc = aligned_alloc(ALIGN, ROUND_UP((size_t)P->groups * 32 * sizeof(int32_t), ALIGN));
    if (!pc) {
        atomic_store(&J->status, BCONV_ENOMEM);
        return;
    }
    switch (P->ab) {
    case 1: direct_pixels(J, g0, g1, 1, pc); break;
    case 2: direct_pixels(J, g0, g1, 2, pc); break;
    case 4: direct_pixels(J, g0, g1, 4, pc); break;
    default: direct_pixels(J, g0, g1, 8, pc); break;
    }
    free(pc);
}
#endif /* BCONV_X86 */

static void gemm_task(void *ctx, int tid, int nthreads) {
    job *J = ctx;
    int64_t b0 = J->blocks * tid / nthreads, b1 = J->blocks * (tid + 1) / nthreads;
    if (b0 >= b1) return;
    const prepared *P = J->prep;
    const geometry *G = &GEOMETRY[P->path];
    size_t rows_bytes = ROUND_UP((size_t)J->block * P->kbpad, ALIGN);
    size_t split_bytes = G->split ? 2 * rows_bytes : 0;
    size_t class_bytes = ROUND_UP((size_t)J->block * sizeof(int64_t), ALIGN);
    uint8_t *mem = aligned_alloc(ALIGN, rows_bytes + split_bytes + class_bytes);
    if (!mem) {
        atomic_store(&J->status, BCONV_ENOMEM);
        return;
    }
    uint8_t *rows = mem, *scratch = mem + rows_bytes;
    int64_t *class_offset = (int64_t *)(mem + rows_bytes + split_bytes);
    for (int64_t b = b0; b < b1; b++) {
        int64_t g0 = b * J->block;
        int count = J->outputs - g0 < J->block ? (int)(J->outputs - g0) : J->block;
        im2col(J, g0, count, ROUND_UP(count, G->mr), rows, class_offset);
        switch (P->path) {
#if defined(BCONV_X86)
        case PATH_AVX2: block_avx2(J, g0, count, rows, scratch, class_offset); break;
        case PATH_AVX512BW: block_avx512bw(J, g0, count, rows, scratch, class_offset); break;
        case PATH_VPOPCNTDQ: block_vpopcntdq(J, g0, count, rows, scratch, class_offset); break;
#endif
        default: block_scalar(J, g0, count, rows, scratch, class_offset); break;
        }
    }
    free(mem);
}

/* ------------------------------------------------------------------------------------------------ */
/* Border classes and the zero-padding correction                                                   */

/* Class of each output coordinate along one axis: the range [lo, hi) of taps inside the input. */
static int axis_classes(int outputs, int size, int k, int stride, int pad, int dilation, int32_t *cls,
                        int32_t *lo_of, int32_t *hi_of) {
    int count = 0;
    for (int o = 0; o < outputs; o++) {
        int lo = k, hi = 0;
        for (int t = 0; t < k; t++) {
            int i = o * stride - pad + t * dilation;
            if (i >= 0 && i < size) {
                if (t < lo) lo = t;
                hi = t + 1;
            }
        }
        if (hi == 0) lo = 0;
        int c = 0;
        while (c < count && !(lo_of[c] == lo && hi_of[c] == hi)) c++;
        if (c == count) {
            lo_of[count] = lo;
            hi_of[count] = hi;
            count++;
        }
        cls[o] = c;
    }
    return count;
}

/* ------------------------------------------------------------------------------------------------ */
/* Exported functions                                                                                */

BCONV_EXPORT int bconv_abi_version(void) { return BCONV_ABI_VERSION; }

#ifndef BCONV_SOURCE_SHA256
#define BCONV_SOURCE_SHA256 "" /* setup.py passes the SHA-256 of this file; "" when built by hand */
#endif

/* The SHA-256 (hex) of the bconv.c this library was built from, or "" when unknown. */
BCONV_EXPORT const char *bconv_source_sha256(void) { return BCONV_SOURCE_SHA256; }

/* Bit i set: path i can run on this CPU (and is compiled in). */
BCONV_EXPORT int bconv_cpu_paths(void) { return cpu_paths() & compiled_paths(); }

/* Bit i set: path i is compiled into this build. */
BCONV_EXPORT int bconv_compiled_paths(void) { return compiled_paths(); }

/* 1 when built against SIMDe (intrinsics emulated, for testing only), else 0. */
BCONV_EXPORT int bconv_emulated(void) {
#if defined(BCONV_EMULATED)
    return 1;
#else
    return 0;
#endif
}

static int64_t layout(int path, int o, int kh, int kw, int c, prepared *P) {
    if (path < 0 || path >= NPATHS || o <= 0 || kh <= 0 || kw <= 0 || c <= 0) return BCONV_EINVAL;
    const geometry *G = &GEOMETRY[path];
    int64_t cb = (c + 7) / 8, kb = (int64_t)kh * kw * cb;
    int64_t kbpad = ROUND_UP(kb, G->vb);
    if (kbpad > INT32_MAX / 16 || (int64_t)kh * kw * c > (1 << 24)) return BCONV_EINVAL;
    memset(P, 0, sizeof *P);
    P->magic = BCONV_MAGIC;
    P->abi = BCONV_ABI_VERSION;
    P->path = path;
    P->out_channels = o;
    P->kh = kh;
    P->kw = kw;
    P->in_channels = c;
    P->cb = (int32_t)cb;
    P->kb = (int32_t)kb;
    P->kbpad = (int32_t)kbpad;
    P->nv = (int32_t)(kbpad / G->vb);
    P->opad = ROUND_UP(o, G->nr);
    P->ab = (int32_t)cb;
    P->off_wsum = ROUND_UP((int64_t)sizeof(prepared), ALIGN);
    P->off_panels = P->off_wsum + ROUND_UP((int64_t)o * kh * kw * 4, ALIGN);
    P->total = P->off_panels + (int64_t)P->opad * kbpad * (G->split ? 2 : 1);
#if defined(BCONV_X86)
    if (path != PATH_SCALAR && cb <= 8 && kh * kw <= DIRECT_MAX_TAPS) {
        int lb = cb <= 1 ? 1 : cb <= 2 ? 2 : cb <= 4 ? 4 : 8;
        P->direct = 1;
        P->ab = lb;
        P->groups = (int32_t)((o + 32 / lb - 1) / (32 / lb));
        P->total = P->off_panels + (int64_t)kh * kw * P->groups * 64;
    }
#endif
    return P->total;
}

/* Bytes of the prepared weights of a conv with o output and c input channels, kh x kw (< 0: invalid). */
BCONV_EXPORT int64_t bconv_prepared_size(int path, int o, int kh, int kw, int c) {
    prepared P;
    return layout(path, o, kh, kw, c, &P);
}

/*
 * Repacks weight bits into the layout of one path. w_bits: uint8 [o][kh][kw][8 * ceil(c / 64)], bits
 * along the input channels, LSB first, 1 = -1 (bits past c are ignored). dst: size bytes from
 * bconv_prepared_size, any alignment (64 bytes is best).
 */
BCONV_EXPORT int bconv_prepare(int path, const uint8_t *w_bits, int o, int kh, int kw, int c, void *dst, int64_t size) {
    prepared P;
    if (!w_bits || !dst || layout(path, o, kh, kw, c, &P) != size) return BCONV_EINVAL;
    const geometry *G = &GEOMETRY[path];
    uint8_t *base = dst;
    memset(base, 0, (size_t)size);
    memcpy(base, &P, sizeof P);
    int32_t *wsum = (int32_t *)(base + P.off_wsum);
    uint8_t *panels = base + P.off_panels;
    const int cbytes = 8 * ((c + 63) / 64);
    const uint8_t last_mask = c % 8 ? (uint8_t)((1u << (c % 8)) - 1) : 0xff;
    uint8_t *row = calloc((size_t)P.kbpad, 1);
    if (!row) return BCONV_ENOMEM;
    for (int oc = 0; oc < o; oc++) {
        memset(row, 0, (size_t)P.kbpad);
        for (int t = 0; t < kh * kw; t++) {
            const uint8_t *src = w_bits + ((size_t)oc * kh * kw + t) * cbytes;
            uint8_t *d = row + (size_t)t * P.cb;
            int ones = 0;
            for (int b = 0; b < P.cb; b++) {
                d[b] = b == P.cb - 1 ? (uint8_t)(src[b] & last_mask) : src[b];
                ones += __builtin_popcount(d[b]);
            }
            wsum[(size_t)oc * kh * kw + t] = c - 2 * ones;
        }
        if (P.direct) { /* [tap][group][low nibbles, high nibbles][32 bytes], channel oc in lane oc % lanes */
            int lanes = 32 / P.ab;
            for (int t = 0; t < kh * kw; t++) {
                uint8_t *lo = panels + ((size_t)t * P.groups + oc / lanes) * 64 + (size_t)(oc % lanes) * P.ab;
                for (int b = 0; b < P.cb; b++) {
                    lo[b] = row[(size_t)t * P.cb + b] & 0x0f;
                    lo[32 + b] = row[(size_t)t * P.cb + b] >> 4;
                }
            }
            continue;
        }
        /* panel of NR channels: for each vector v, channel j: [low nibbles, high nibbles] or the raw bytes */
        size_t panel = (size_t)(oc / G->nr), j = (size_t)(oc % G->nr);
        for (int v = 0; v < P.nv; v++) {
            const uint8_t *src = row + (size_t)v * G->vb;
            if (G->split) {
                uint8_t *lo = panels + (((panel * P.nv + v) * G->nr + j) * 2) * G->vb, *hi = lo + G->vb;
                for (int b = 0; b < G->vb; b++) {
                    lo[b] = src[b] & 0x0f;
                    hi[b] = src[b] >> 4;
                }
            } else {
                memcpy(panels + ((panel * P.nv + v) * G->nr + j) * G->vb, src, (size_t)G->vb);
            }
        }
    }
    free(row);
    return BCONV_OK;
}

/*
 * The convolution. prep: from bconv_prepare (it fixes the path and the weight shape). x: float32
 * [n][h][w][c]; beta: float32 [c] or NULL; mul, add: float32 [o]; out: float32 [n][oh][ow][o] with
 * oh = (h + 2 ph - dh (kh - 1) - 1) / sh + 1 (and ow likewise). nthreads: threads to use (>= 1).
 */
BCONV_EXPORT int bconv_conv2d(const void *prep, int nthreads, const float *x, const float *beta, int n, int h, int w,
                              int c, int sh, int sw, int ph, int pw, int dh, int dw, const float *mul, const float *add,
                              float *out) {
    const prepared *P = prep;
    if (!P || !x || !mul || !add || !out) return BCONV_EINVAL;
    if (P->magic != BCONV_MAGIC || P->abi != BCONV_ABI_VERSION || P->path < 0 || P->path >= NPATHS) return BCONV_EPREP;
    if (!(bconv_cpu_paths() >> P->path & 1)) return BCONV_EPATH;
    if (n <= 0 || h <= 0 || w <= 0 || c != P->in_channels || sh <= 0 || sw <= 0 || ph < 0 || pw < 0 || dh <= 0 ||
        dw <= 0)
        return BCONV_EINVAL;
    int64_t oh = ((int64_t)h + 2 * ph - (int64_t)dh * (P->kh - 1) - 1) / sh + 1;
    int64_t ow = ((int64_t)w + 2 * pw - (int64_t)dw * (P->kw - 1) - 1) / sw + 1;
    if ((int64_t)h + 2 * ph < (int64_t)dh * (P->kh - 1) + 1 || (int64_t)w + 2 * pw < (int64_t)dw * (P->kw - 1) + 1)
        return BCONV_EINVAL;
    if (nthreads < 1) nthreads = 1;

    job J;
    memset(&J, 0, sizeof J);
    J.prep = P;
    J.panels = (const uint8_t *)prep + P->off_panels;
    J.x = x;
    J.beta = beta;
    J.mul = mul;
    J.add = add;
    J.out = out;
    J.n = n, J.h = h, J.w = w, J.c = c, J.oh = (int)oh, J.ow = (int)ow;
    J.sh = sh, J.sw = sw, J.ph = ph, J.pw = pw, J.dh = dh, J.dw = dw;
    J.pixels = (int64_t)n * h * w;
    J.outputs = (int64_t)n * oh * ow;
    atomic_init(&J.status, BCONV_OK);

    const geometry *G = &GEOMETRY[P->path];
    /* an output block: about 16 KiB of im2col rows (kept in L1 while the weight panels stream past) */
    int block = (int)(16384 / ((int64_t)P->kbpad * (G->split ? 3 : 1)));
    block = block / G->mr * G->mr;
    if (block < G->mr) block = G->mr;
    if (block > 256) block = 256;
    J.block = block;
    J.blocks = (J.outputs + block - 1) / block;

    int rc = BCONV_ENOMEM;
    uint8_t *act = aligned_alloc(ALIGN, ROUND_UP((size_t)J.pixels * P->ab, ALIGN));
    int32_t *classes = malloc(sizeof(int32_t) * (size_t)(3 * (oh + ow)));
    int32_t *corr = NULL;
    if (!act || !classes) goto done;
    J.act = act;

    if (!P->direct && (ph > 0 || pw > 0)) {
        int32_t *row_class = classes, *col_class = classes + oh;
        int32_t *row_lo = col_class + ow, *row_hi = row_lo + oh, *col_lo = row_hi + oh, *col_hi = col_lo + ow;
        int nrc = axis_classes((int)oh, h, P->kh, sh, ph, dh, row_class, row_lo, row_hi);
        int ncc = axis_classes((int)ow, w, P->kw, sw, pw, dw, col_class, col_lo, col_hi);
        int interior = 1;
        for (int r = 0; r < nrc; r++) interior &= row_lo[r] == 0 && row_hi[r] == P->kh;
        for (int q = 0; q < ncc; q++) interior &= col_lo[q] == 0 && col_hi[q] == P->kw;
        if (!interior) {
            corr = malloc(sizeof(int32_t) * (size_t)nrc * ncc * P->out_channels);
            if (!corr) goto done;
            const int32_t *wsum = (const int32_t *)((const uint8_t *)prep + P->off_wsum);
            for (int r = 0; r < nrc; r++)
                for (int q = 0; q < ncc; q++)
                    for (int oc = 0; oc < P->out_channels; oc++) {
                        int32_t s = 0;
                        for (int ky = 0; ky < P->kh; ky++)
                            for (int kx = 0; kx < P->kw; kx++) {
                                int inside = ky >= row_lo[r] && ky < row_hi[r] && kx >= col_lo[q] && kx < col_hi[q];
                                if (!inside) s += wsum[((size_t)oc * P->kh + ky) * P->kw + kx];
                            }
                        corr[((size_t)r * ncc + q) * P->out_channels + oc] = s;
                    }
            J.corr = corr;
            J.row_class = row_class;
            J.col_class = col_class;
            J.col_classes = ncc;
        }
    }

    int pack_threads = J.pixels < 64 * (int64_t)nthreads ? 1 : nthreads;
    run_parallel(pack_task, &J, pack_threads);
#if defined(BCONV_X86)
    if (P->direct) {
        int64_t chunks = (J.outputs + 15) / 16; /* at least 16 output pixels per thread */
        run_parallel(direct_task, &J, chunks < nthreads ? (int)chunks : nthreads);
    } else
#endif
        run_parallel(gemm_task, &J, J.blocks < nthreads ? (int)J.blocks : nthreads);
    rc = atomic_load(&J.status);

done:
    free(corr);
    free(classes);
    free(act);
    return rc;
}
