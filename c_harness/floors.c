/* Measures, on this machine, the two floors a model library's speed is judged against.
 *
 *   floors BYTES MACS PASSES REPEATS [WINDOWS]
 *
 * stream  the per-call floor: microseconds to read BYTES (the model's weights and biases,
 *         packed as the dense kernels read them: one sequential stream) once from the
 *         cache, as one call of the library must. The buffer is read PASSES times back to
 *         back (it stays in L2 when it fits, as the weights do between calls); one vector
 *         load per 32 (AVX2) or 64 (AVX-512) bytes into independent accumulators, so
 *         loads, not adds, bound it.
 * fma     the batched floor: microseconds for MACS multiply-adds at the FMA peak, from
 *         independent chains of vector FMAs (12 accumulators in registers, more than
 *         latency x throughput), nothing loaded.
 *
 * Each repeat runs the passes as WINDOWS (default 1) windows of PASSES / WINDOWS passes,
 * each window the stream then the FMA chains, each timed alone, as c_harness/timing.c
 * times a library. Prints REPEATS lines "stream_us fma_us isa stream_mean_us fma_mean_us":
 * per pass, the fastest window (a shared machine preempts most long windows), then the
 * mean over all windows.
 * The code path is picked like the library's: AVX-512F, else AVX2+FMA, else portable C
 * (vector extensions, multiply then add). Compile with the library's flags. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#include <immintrin.h>
#define FLOORS_X86 1
#endif

typedef float v4 __attribute__((vector_size(16)));

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static volatile float sink;

/* ---- portable ---------------------------------------------------------------------- */
static float stream_portable(const float *buf, long n)
{
    v4 a[8] = {{0}};
    long i;
    int k;
    for (i = 0; i + 32 <= n; i += 32)
        for (k = 0; k < 8; ++k) {
            v4 v;
            memcpy(&v, buf + i + 4 * k, sizeof v);
            a[k] += v;
        }
    for (k = 1; k < 8; ++k)
        a[0] += a[k];
    return a[0][0] + a[0][1] + a[0][2] + a[0][3];
}

static float fma_portable(long iters)
{
    v4 a[12], m = {0.999999f, 0.999999f, 0.999999f, 0.999999f}, c = {1e-7f, 1e-7f, 1e-7f, 1e-7f};
    long i;
    int k;
    for (k = 0; k < 12; ++k)
        a[k] = (v4){(float)k, 1, 2, 3};
    for (i = 0; i < iters; ++i) {
        for (k = 0; k < 12; ++k)
            a[k] = a[k] * m + c;
        __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]), "+x"(a[4]), "+x"(a[5]));
    }
    for (k = 1; k < 12; ++k)
        a[0] += a[k];
    return a[0][0];
}

#if defined(FLOORS_X86)
/* ---- AVX2 + FMA -------------------------------------------------------------------- */
__attribute__((target("avx2,fma"))) static float stream_avx2(const float *buf, long n)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    long i;
    for (i = 0; i + 64 <= n; i += 64) {
        a0 = _mm256_add_ps(a0, _mm256_load_ps(buf + i));
        a1 = _mm256_add_ps(a1, _mm256_load_ps(buf + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_load_ps(buf + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_load_ps(buf + i + 24));
        a4 = _mm256_add_ps(a4, _mm256_load_ps(buf + i + 32));
        a5 = _mm256_add_ps(a5, _mm256_load_ps(buf + i + 40));
        a6 = _mm256_add_ps(a6, _mm256_load_ps(buf + i + 48));
        a7 = _mm256_add_ps(a7, _mm256_load_ps(buf + i + 56));
    }
    a0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                       _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    return _mm256_cvtss_f32(a0);
}

#define FMA12(T, fma, a, m, c) \
    a[0] = fma(a[0], m, c); a[1] = fma(a[1], m, c); a[2] = fma(a[2], m, c); a[3] = fma(a[3], m, c); \
    a[4] = fma(a[4], m, c); a[5] = fma(a[5], m, c); a[6] = fma(a[6], m, c); a[7] = fma(a[7], m, c); \
    a[8] = fma(a[8], m, c); a[9] = fma(a[9], m, c); a[10] = fma(a[10], m, c); a[11] = fma(a[11], m, c)

__attribute__((target("avx2,fma"))) static float fma_avx2(long iters)
{
    __m256 a[12], m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    long i;
    int k;
    for (k = 0; k < 12; ++k)
        a[k] = _mm256_set1_ps((float)k);
    for (i = 0; i < iters; ++i) {
        FMA12(__m256, _mm256_fmadd_ps, a, m, c);
    }
    for (k = 1; k < 12; ++k)
        a[0] = _mm256_add_ps(a[0], a[k]);
    return _mm256_cvtss_f32(a[0]);
}

/* ---- AVX-512F ---------------------------------------------------------------------- */
__attribute__((target("avx512f,avx2,fma"))) static float stream_avx512(const float *buf, long n)
{
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long i;
    for (i = 0; i + 64 <= n; i += 64) {
        a0 = _mm512_add_ps(a0, _mm512_load_ps(buf + i));
        a1 = _mm512_add_ps(a1, _mm512_load_ps(buf + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_load_ps(buf + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_load_ps(buf + i + 48));
    }
    a0 = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    return _mm512_reduce_add_ps(a0);
}

__attribute__((target("avx512f,avx2,fma"))) static float fma_avx512(long iters)
{
    __m512 a[12], m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
    long i;
    int k;
    for (k = 0; k < 12; ++k)
        a[k] = _mm512_set1_ps((float)k);
    for (i = 0; i < iters; ++i) {
        FMA12(__m512, _mm512_fmadd_ps, a, m, c);
    }
    for (k = 1; k < 12; ++k)
        a[0] = _mm512_add_ps(a[0], a[k]);
    return _mm512_reduce_add_ps(a[0]);
}
#endif

int main(int argc, char **argv)
{
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s BYTES MACS PASSES REPEATS [WINDOWS]\n", argv[0]);
        return 2;
    }
    long bytes = atol(argv[1]), macs = atol(argv[2]), passes = atol(argv[3]), repeats = atol(argv[4]);
    long windows = argc == 6 ? atol(argv[5]) : 1;
    if (bytes < 1 || macs < 1 || passes < 1 || repeats < 1 || windows < 1 || windows > passes) {
        fprintf(stderr, "BYTES, MACS, PASSES and REPEATS must be positive, WINDOWS in 1..PASSES\n");
        return 2;
    }
    long chunk = passes / windows;  /* passes per window */
    long n = (bytes / 4 + 63) / 64 * 64;  /* floats, whole 256-byte groups */
    float *buf = NULL;
    if (posix_memalign((void **)&buf, 64, n * sizeof(float)) != 0) { fprintf(stderr, "cannot allocate %ld bytes\n", bytes); return 1; }
    for (long i = 0; i < n; ++i)
        buf[i] = (float)(i % 7) * 0.25f;

    float (*stream)(const float *, long) = stream_portable;
    float (*fma)(long) = fma_portable;
    int lanes = 4;
    const char *isa = "baseline";
#if defined(FLOORS_X86)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        stream = stream_avx512, fma = fma_avx512, lanes = 16, isa = "avx512f";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        stream = stream_avx2, fma = fma_avx2, lanes = 8, isa = "avx2+fma";
    }
#endif
    /* FMA chains: iterations of 12 vector FMAs making MACS multiply-adds, PASSES times */
    long iters = (macs + 12L * lanes - 1) / (12L * lanes);
    double per_pass_macs = (double)iters * 12 * lanes;
    double scale = (double)macs / per_pass_macs;
    for (long rep = -1; rep < repeats; ++rep) {  /* rep -1 warms caches and clocks */
        double s_best = 1e300, f_best = 1e300, s_total = 0, f_total = 0;
        for (long w = 0; w < windows; ++w) {
            double t0 = now_us();
            for (long p = 0; p < chunk; ++p)
                sink = stream(buf, n);
            double t1 = now_us();
            sink = fma(iters * chunk);
            double t2 = now_us();
            s_best = t1 - t0 < s_best ? t1 - t0 : s_best;
            f_best = t2 - t1 < f_best ? t2 - t1 : f_best;
            s_total += t1 - t0;
            f_total += t2 - t1;
        }
        if (rep >= 0)
            printf("%.4f %.4f %s %.4f %.4f\n", s_best / chunk, f_best / chunk * scale, isa,
                   s_total / (chunk * windows), f_total / (chunk * windows) * scale);
    }
    free(buf);
    return 0;
}
