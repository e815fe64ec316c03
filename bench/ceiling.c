/* What this CPU allows a batch-1 decode step (`python -m bench.ceiling`; compiled there, never by the server).
 *
 * One pass over a weight matrix the size of the shipped model's block weights (K = 128 rows, N columns), three ways,
 * each the best of `reps` passes (the buffer stays in the cache level it fits, as the step's weights do):
 *   read  - a pure streaming read of the bytes (32-byte loads and an integer add): the bandwidth limit;
 *   f16   - the ideal float16 GEMV: y = x W with 8 independent 8-wide sums per 64 columns, one F16C convert and one
 *           FMA per 8 weights (the fused step's inner loop with nothing around it);
 *   int8  - the ideal int8 GEMV on AVX2: 16 weights widened to int16 against a broadcast pair of int16 activations in
 *           vpmaddwd, int32 sums (the fused step's int8 inner loop), over the int8 bytes.
 * Prints one JSON object: ms per pass and GB/s of each, and each GEMV's largest difference from a plain scalar GEMV
 * of the same numbers on the first and last 64 columns (`f16_max_err` relative, `int8_max_err` exact: 0). */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define K 128

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double read_pass(const void *buf, size_t bytes, volatile int *sink) {
    double t = now();
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    const __m256i *p = (const __m256i *)buf;
    for (size_t i = 0; i + 4 <= bytes / 32; i += 4) {
        s0 = _mm256_add_epi32(s0, _mm256_loadu_si256(p + i));
        s1 = _mm256_add_epi32(s1, _mm256_loadu_si256(p + i + 1));
        s2 = _mm256_add_epi32(s2, _mm256_loadu_si256(p + i + 2));
        s3 = _mm256_add_epi32(s3, _mm256_loadu_si256(p + i + 3));
    }
    t = now() - t;
    *sink += _mm256_extract_epi32(_mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3)), 0);
    return t;
}

static double f16_pass(const uint16_t *w, int N, const float *x, float *y) {
    double t = now();
    for (int n = 0; n < N; n += 64) {
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        const uint16_t *wp = w + n;
        for (int k = 0; k < K; k++, wp += N) {
            __m256 xb = _mm256_set1_ps(x[k]);
            for (int j = 0; j < 8; j++)
                a[j] = _mm256_fmadd_ps(xb, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wp + 8 * j))), a[j]);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(y + n + 8 * j, a[j]);
    }
    return now() - t;
}

static double i8_pass(const int8_t *w, int N, const int16_t *xq, int32_t *y) {
    double t = now();
    const int32_t *xp = (const int32_t *)xq;
    for (int n = 0; n < N; n += 64) {
        __m256i c[8];
        for (int j = 0; j < 8; j++) c[j] = _mm256_setzero_si256();
        const int8_t *wp = w + (size_t)n * 2; /* (K/2, N, 2) */
        for (int i = 0; i < K / 2; i++, wp += (size_t)N * 2) {
            __m256i xb = _mm256_set1_epi32(xp[i]);
            for (int j = 0; j < 8; j++)
                c[j] = _mm256_add_epi32(
                    c[j], _mm256_madd_epi16(xb, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wp + 16 * j)))));
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_si256((__m256i *)(y + n + 8 * j), c[j]);
    }
    return now() - t;
}

int main(int argc, char **argv) {
    size_t weights = argc > 1 ? strtoull(argv[1], NULL, 10) : 3232512; /* the shipped model's block weights */
    int reps = argc > 2 ? atoi(argv[2]) : 200;
    int N = (int)(weights / K);
    N -= N % 64;
    size_t n = (size_t)K * N;
    uint16_t *w16 = aligned_alloc(64, n * 2);
    int8_t *w8 = aligned_alloc(64, n);
    float *y = aligned_alloc(64, (size_t)N * 4);
    int32_t *yi = aligned_alloc(64, (size_t)N * 4);
    float x[K];
    int16_t xq[K];
    if (!w16 || !w8 || !y || !yi) return 1;
    for (size_t i = 0; i < n; i++) {
        w16[i] = (uint16_t)(0x3c00 ^ (i & 0x3ff)); /* finite halves around 1 */
        w8[i] = (int8_t)((i * 37) % 255 - 127);
    }
    for (int k = 0; k < K; k++) {
        x[k] = 1.0f / (float)(k + 1);
        xq[k] = (int16_t)(k % 255 - 127);
    }
    volatile int sink = 0;
    double r16 = 1e9, r8 = 1e9, f16 = 1e9, i8 = 1e9;
    double t; /* each kind in its own run of passes (the best pass: the others' data gone from the caches) */
    for (int r = 0; r < reps; r++)
        if ((t = read_pass(w16, n * 2, &sink)) < r16) r16 = t;
    for (int r = 0; r < reps; r++)
        if ((t = f16_pass(w16, N, x, y)) < f16) f16 = t;
    for (int r = 0; r < reps; r++)
        if ((t = read_pass(w8, n, &sink)) < r8) r8 = t;
    for (int r = 0; r < reps; r++)
        if ((t = i8_pass(w8, N, xq, yi)) < i8) i8 = t;
    double f16_err = 0.0, i8_err = 0.0; /* the loops compute what they claim: a scalar GEMV of the same numbers */
    for (int c = 0; c < N; c = (c == 63 ? N - 64 : c + 1)) {
        float ref = 0.f;
        int32_t iref = 0;
        for (int k = 0; k < K; k++) {
            ref += x[k] * _cvtsh_ss(w16[(size_t)k * N + c]);
            iref += (int32_t)xq[k] * w8[(size_t)(k / 2) * N * 2 + (size_t)c * 2 + k % 2];
        }
        double e = (y[c] - ref) / (ref != 0.f ? (ref > 0 ? ref : -ref) : 1.f);
        if ((e < 0 ? -e : e) > f16_err) f16_err = e < 0 ? -e : e;
        if (abs(yi[c] - iref) > i8_err) i8_err = abs(yi[c] - iref);
    }
    printf("{\"weights\": %zu, \"reps\": %d, \"read_f16_bytes_ms\": %.4f, \"f16_gemv_ms\": %.4f, "
           "\"read_int8_bytes_ms\": %.4f, \"int8_gemv_ms\": %.4f, \"read_f16_gb_s\": %.2f, \"f16_gemv_gb_s\": %.2f, "
           "\"read_int8_gb_s\": %.2f, \"int8_gemv_gb_s\": %.2f, \"f16_max_err\": %.3g, \"int8_max_err\": %.0f}\n",
           n, reps, 1e3 * r16, 1e3 * f16, 1e3 * r8, 1e3 * i8, 2e-9 * (double)n / r16, 2e-9 * (double)n / f16,
           1e-9 * (double)n / r8, 1e-9 * (double)n / i8, f16_err, i8_err);
    return 0;
}
