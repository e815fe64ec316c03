/* A whole decode step of the Shortcut Transformer in one call: every layer of every row, no tensor library.
 *
 * The boundary is fused_step.h: the model's dims (ShortcutDims), its weights with one named pointer per block
 * parameter (ShortcutWeights / ShortcutLayerWeights, packed and pointed at once by model/fast/decoder.py), and one
 * step's arguments (ShortcutStepArgs, with the request's stream edits as ShortcutEdits). Loaded by model/fast/loader.py,
 * which refuses a library whose ABI version is not the one model/fast/abi.py mirrors.
 *
 * Same maths as model/decode.py's steps (the reference is model/transformer.py): pre-LayerNorm blocks, fused
 * q/k/v, causal attention over each row's own cache up to its position, GELU (tanh), the stream edits where each
 * part's F(x) meets the stream (`edit_update`, the C twin of model/edits.py's `apply`), the residual stream of traced
 * rows, a final LayerNorm and the tied unembedding. Block matrices are float16 (arithmetic in float32, as FBGEMM's
 * fp16-weight GEMM does) or float32; the unembedding is float32.
 *
 * Every row is computed alone and in the same order whatever the batch (the matrix kernels that take 4 rows at a
 * time sum each output in the same order as the 1-row kernel), so a row's numbers do not depend on the others.
 * Built twice (model/fast/build.py): for x86-64 with AVX2, FMA and F16C (8-wide matrix kernels), and with AVX-512
 * as well (16-wide; the same sums in the same order, so both builds give the same numbers); with -ffp-contract=off so
 * that only the explicit FMAs fuse. Keys and values are cached as float32 or float16.
 */
#include "fused_step.h"

#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LN_EPS 1e-5f

int shortcut_fused_abi_version(void) { return SHORTCUT_FUSED_ABI_VERSION; }

/* The layout of every struct in fused_step.h, as this compiler lays it out */
#define LAYOUT_STRUCT(S) {#S, 0, sizeof(S)}
#define LAYOUT_FIELD(S, f) {#S "." #f, offsetof(S, f), sizeof(((S *)0)->f)}
static const struct {
    const char *name;
    size_t offset, size;
} LAYOUT[] = {
    LAYOUT_STRUCT(ShortcutDims),
    LAYOUT_FIELD(ShortcutDims, d_model),
    LAYOUT_FIELD(ShortcutDims, n_head),
    LAYOUT_FIELD(ShortcutDims, n_layer),
    LAYOUT_FIELD(ShortcutDims, d_ff),
    LAYOUT_FIELD(ShortcutDims, vocab_size),
    LAYOUT_FIELD(ShortcutDims, block_size),
    LAYOUT_FIELD(ShortcutDims, half),
    LAYOUT_FIELD(ShortcutDims, residual),
    LAYOUT_STRUCT(ShortcutLayerWeights),
    LAYOUT_FIELD(ShortcutLayerWeights, w_qkv),
    LAYOUT_FIELD(ShortcutLayerWeights, w_o),
    LAYOUT_FIELD(ShortcutLayerWeights, w_fc),
    LAYOUT_FIELD(ShortcutLayerWeights, w_p),
    LAYOUT_FIELD(ShortcutLayerWeights, ln_1_w),
    LAYOUT_FIELD(ShortcutLayerWeights, ln_1_b),
    LAYOUT_FIELD(ShortcutLayerWeights, b_qkv),
    LAYOUT_FIELD(ShortcutLayerWeights, b_o),
    LAYOUT_FIELD(ShortcutLayerWeights, ln_2_w),
    LAYOUT_FIELD(ShortcutLayerWeights, ln_2_b),
    LAYOUT_FIELD(ShortcutLayerWeights, b_fc),
    LAYOUT_FIELD(ShortcutLayerWeights, b_p),
    LAYOUT_STRUCT(ShortcutWeights),
    LAYOUT_FIELD(ShortcutWeights, wte),
    LAYOUT_FIELD(ShortcutWeights, wpe),
    LAYOUT_FIELD(ShortcutWeights, unembed_t),
    LAYOUT_FIELD(ShortcutWeights, ln_f_w),
    LAYOUT_FIELD(ShortcutWeights, ln_f_b),
    LAYOUT_FIELD(ShortcutWeights, layers),
    LAYOUT_STRUCT(ShortcutEdits),
    LAYOUT_FIELD(ShortcutEdits, gates),
    LAYOUT_FIELD(ShortcutEdits, add),
    LAYOUT_FIELD(ShortcutEdits, n_prompt),
    LAYOUT_STRUCT(ShortcutStepArgs),
    LAYOUT_FIELD(ShortcutStepArgs, B),
    LAYOUT_FIELD(ShortcutStepArgs, kv_half),
    LAYOUT_FIELD(ShortcutStepArgs, tokens),
    LAYOUT_FIELD(ShortcutStepArgs, pos),
    LAYOUT_FIELD(ShortcutStepArgs, k_cache),
    LAYOUT_FIELD(ShortcutStepArgs, v_cache),
    LAYOUT_FIELD(ShortcutStepArgs, layer_stride),
    LAYOUT_FIELD(ShortcutStepArgs, row_stride),
    LAYOUT_FIELD(ShortcutStepArgs, edits),
    LAYOUT_FIELD(ShortcutStepArgs, trace_rows),
    LAYOUT_FIELD(ShortcutStepArgs, R),
    LAYOUT_FIELD(ShortcutStepArgs, stream),
    LAYOUT_FIELD(ShortcutStepArgs, logits),
};

const char *shortcut_fused_layout(int i, int64_t *offset, int64_t *size) {
    if (i < 0 || i >= (int)(sizeof(LAYOUT) / sizeof(LAYOUT[0]))) return NULL;
    *offset = (int64_t)LAYOUT[i].offset;
    *size = (int64_t)LAYOUT[i].size;
    return LAYOUT[i].name;
}

/* Which build this is, asked by the loader before any kernel runs (an AVX-512 build on a CPU without it is refused) */
const char *shortcut_fused_isa(void) {
#ifdef __AVX512F__
    return "avx512";
#else
    return "avx2";
#endif
}

/* ---- vector exp (Cephes' expf: range reduction by ln 2, degree-6 polynomial) ---- */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- y (rows, N) = x (rows, K) @ W (K, N) + bias; N % 16 == 0. Each output: fma over k in order, then + bias ---- */
#define LOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD_F32(p) _mm256_loadu_ps(p)

#ifndef __AVX512F__
#define DEFINE_MM(NAME, WT, LOAD)                                                                              \
    static void NAME(int rows, int K, int N, const float *x, const WT *w, const float *bias, float *y) {     \
        int b = 0;                                                                                            \
        for (; b + 6 <= rows; b += 6) { /* 6 rows x 16 outputs: 12 sums in registers, the weights read once */ \
            const float *x0 = x + (size_t)b * K;                                                              \
            for (int n = 0; n < N; n += 16) {                                                                 \
                __m256 c[6][2];                                                                               \
                for (int r = 0; r < 6; r++) c[r][0] = c[r][1] = _mm256_setzero_ps();                          \
                const WT *wp = w + n;                                                                         \
                for (int k = 0; k < K; k++, wp += N) {                                                        \
                    __m256 w0 = LOAD(wp), w1 = LOAD(wp + 8);                                                  \
                    for (int r = 0; r < 6; r++) {                                                             \
                        __m256 xb = _mm256_broadcast_ss(x0 + (size_t)r * K + k);                              \
                        c[r][0] = _mm256_fmadd_ps(xb, w0, c[r][0]);                                           \
                        c[r][1] = _mm256_fmadd_ps(xb, w1, c[r][1]);                                           \
                    }                                                                                         \
                }                                                                                             \
                __m256 b0 = _mm256_loadu_ps(bias + n), b1 = _mm256_loadu_ps(bias + n + 8);                    \
                for (int r = 0; r < 6; r++) {                                                                 \
                    float *yr = y + (size_t)(b + r) * N + n;                                                  \
                    _mm256_storeu_ps(yr, _mm256_add_ps(c[r][0], b0));                                         \
                    _mm256_storeu_ps(yr + 8, _mm256_add_ps(c[r][1], b1));                                     \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
        for (; b + 4 <= rows; b += 4) { /* 4 rows x 16 outputs: the weights read once for 4 rows */          \
            const float *x0 = x + (size_t)b * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;                    \
            for (int n = 0; n < N; n += 16) {                                                                 \
                __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;                            \
                __m256 a20 = a00, a21 = a00, a30 = a00, a31 = a00;                                            \
                const WT *wp = w + n;                                                                         \
                for (int k = 0; k < K; k++, wp += N) {                                                        \
                    __m256 w0 = LOAD(wp), w1 = LOAD(wp + 8), xb;                                              \
                    xb = _mm256_broadcast_ss(x0 + k); a00 = _mm256_fmadd_ps(xb, w0, a00);                     \
                    a01 = _mm256_fmadd_ps(xb, w1, a01);                                                       \
                    xb = _mm256_broadcast_ss(x1 + k); a10 = _mm256_fmadd_ps(xb, w0, a10);                     \
                    a11 = _mm256_fmadd_ps(xb, w1, a11);                                                       \
                    xb = _mm256_broadcast_ss(x2 + k); a20 = _mm256_fmadd_ps(xb, w0, a20);                     \
                    a21 = _mm256_fmadd_ps(xb, w1, a21);                                                       \
                    xb = _mm256_broadcast_ss(x3 + k); a30 = _mm256_fmadd_ps(xb, w0, a30);                     \
                    a31 = _mm256_fmadd_ps(xb, w1, a31);                                                       \
                }                                                                                             \
                __m256 b0 = _mm256_loadu_ps(bias + n), b1 = _mm256_loadu_ps(bias + n + 8);                    \
                float *y0 = y + (size_t)b * N + n;                                                            \
                _mm256_storeu_ps(y0, _mm256_add_ps(a00, b0)); _mm256_storeu_ps(y0 + 8, _mm256_add_ps(a01, b1)); \
                y0 += N;                                                                                      \
                _mm256_storeu_ps(y0, _mm256_add_ps(a10, b0)); _mm256_storeu_ps(y0 + 8, _mm256_add_ps(a11, b1)); \
                y0 += N;                                                                                      \
                _mm256_storeu_ps(y0, _mm256_add_ps(a20, b0)); _mm256_storeu_ps(y0 + 8, _mm256_add_ps(a21, b1)); \
                y0 += N;                                                                                      \
                _mm256_storeu_ps(y0, _mm256_add_ps(a30, b0)); _mm256_storeu_ps(y0 + 8, _mm256_add_ps(a31, b1)); \
            }                                                                                                 \
        }                                                                                                     \
        for (; b < rows; b++) { /* one row: 64 outputs at a time (8 independent sums), then 16 */            \
            const float *xr = x + (size_t)b * K;                                                              \
            float *yr = y + (size_t)b * N;                                                                    \
            int n = 0;                                                                                        \
            for (; n + 64 <= N; n += 64) {                                                                    \
                __m256 a[8];                                                                                  \
                for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();                                       \
                const WT *wp = w + n;                                                                         \
                for (int k = 0; k < K; k++, wp += N) {                                                        \
                    __m256 xb = _mm256_broadcast_ss(xr + k);                                                  \
                    for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(xb, LOAD(wp + 8 * j), a[j]);           \
                }                                                                                             \
                for (int j = 0; j < 8; j++)                                                                   \
                    _mm256_storeu_ps(yr + n + 8 * j, _mm256_add_ps(a[j], _mm256_loadu_ps(bias + n + 8 * j))); \
            }                                                                                                 \
            for (; n < N; n += 16) {                                                                          \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0;                                                     \
                const WT *wp = w + n;                                                                         \
                for (int k = 0; k < K; k++, wp += N) {                                                        \
                    __m256 xb = _mm256_broadcast_ss(xr + k);                                                  \
                    a0 = _mm256_fmadd_ps(xb, LOAD(wp), a0);                                                   \
                    a1 = _mm256_fmadd_ps(xb, LOAD(wp + 8), a1);                                               \
                }                                                                                             \
                _mm256_storeu_ps(yr + n, _mm256_add_ps(a0, _mm256_loadu_ps(bias + n)));                       \
                _mm256_storeu_ps(yr + n + 8, _mm256_add_ps(a1, _mm256_loadu_ps(bias + n + 8)));               \
            }                                                                                                 \
        }                                                                                                     \
    }

#else
/* The AVX-512 build (a second library, chosen where the CPU has AVX-512): the same kernels 16 floats wide. Each
 * output is still one FMA chain over k in order, then + bias, in every tile, so rows stay independent. */
#define LOAD16_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD16_F32(p) _mm512_loadu_ps(p)

#define DEFINE_MM(NAME, WT, LOAD)                                                                              \
    /* R rows x 32 outputs from column n (R <= 8): 2R sums in registers, each weight read once for R rows */   \
    static inline __attribute__((always_inline)) void NAME##_tile32(int R, int K, int N, int n, const float *x0, \
                                                                    const WT *w, const float *bias, float *y0) { \
        __m512 c[8][2];                                                                                       \
        for (int r = 0; r < R; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();                                  \
        const WT *wp = w + n;                                                                                 \
        for (int k = 0; k < K; k++, wp += N) {                                                                \
            __m512 w0 = LOAD(wp), w1 = LOAD(wp + 16);                                                         \
            for (int r = 0; r < R; r++) {                                                                     \
                __m512 xb = _mm512_set1_ps(x0[(size_t)r * K + k]);                                            \
                c[r][0] = _mm512_fmadd_ps(xb, w0, c[r][0]);                                                   \
                c[r][1] = _mm512_fmadd_ps(xb, w1, c[r][1]);                                                   \
            }                                                                                                 \
        }                                                                                                     \
        __m512 b0 = _mm512_loadu_ps(bias + n), b1 = _mm512_loadu_ps(bias + n + 16);                           \
        for (int r = 0; r < R; r++) {                                                                         \
            _mm512_storeu_ps(y0 + (size_t)r * N + n, _mm512_add_ps(c[r][0], b0));                             \
            _mm512_storeu_ps(y0 + (size_t)r * N + n + 16, _mm512_add_ps(c[r][1], b1));                        \
        }                                                                                                     \
    }                                                                                                         \
    /* R rows x 16 outputs from column n (the last 16 when N % 32 == 16) */                                   \
    static inline __attribute__((always_inline)) void NAME##_tile16(int R, int K, int N, int n, const float *x0, \
                                                                    const WT *w, const float *bias, float *y0) { \
        __m512 c[8];                                                                                          \
        for (int r = 0; r < R; r++) c[r] = _mm512_setzero_ps();                                               \
        const WT *wp = w + n;                                                                                 \
        for (int k = 0; k < K; k++, wp += N) {                                                                \
            __m512 w0 = LOAD(wp);                                                                             \
            for (int r = 0; r < R; r++) c[r] = _mm512_fmadd_ps(_mm512_set1_ps(x0[(size_t)r * K + k]), w0, c[r]); \
        }                                                                                                     \
        __m512 b0 = _mm512_loadu_ps(bias + n);                                                                \
        for (int r = 0; r < R; r++) _mm512_storeu_ps(y0 + (size_t)r * N + n, _mm512_add_ps(c[r], b0));        \
    }                                                                                                         \
    static void NAME##_rows(int R, int K, int N, const float *x0, const WT *w, const float *bias, float *y0) { \
        int n = 0;                                                                                            \
        for (; n + 32 <= N; n += 32) NAME##_tile32(R, K, N, n, x0, w, bias, y0);                              \
        if (n < N) NAME##_tile16(R, K, N, n, x0, w, bias, y0);                                                \
    }                                                                                                         \
    static void NAME(int rows, int K, int N, const float *x, const WT *w, const float *bias, float *y) {     \
        int b = 0;                                                                                            \
        for (; b + 8 <= rows; b += 8) NAME##_rows(8, K, N, x + (size_t)b * K, w, bias, y + (size_t)b * N);    \
        if (b + 4 <= rows) {                                                                                  \
            NAME##_rows(4, K, N, x + (size_t)b * K, w, bias, y + (size_t)b * N);                              \
            b += 4;                                                                                           \
        }                                                                                                     \
        for (; b < rows; b++) { /* one row: 128 outputs at a time (8 independent sums), then 32, 16 */       \
            const float *xr = x + (size_t)b * K;                                                              \
            float *yr = y + (size_t)b * N;                                                                    \
            int n = 0;                                                                                        \
            for (; n + 128 <= N; n += 128) {                                                                  \
                __m512 a[8];                                                                                  \
                for (int j = 0; j < 8; j++) a[j] = _mm512_setzero_ps();                                       \
                const WT *wp = w + n;                                                                         \
                for (int k = 0; k < K; k++, wp += N) {                                                        \
                    __m512 xb = _mm512_set1_ps(xr[k]);                                                        \
                    for (int j = 0; j < 8; j++) a[j] = _mm512_fmadd_ps(xb, LOAD(wp + 16 * j), a[j]);          \
                }                                                                                             \
                for (int j = 0; j < 8; j++)                                                                   \
                    _mm512_storeu_ps(yr + n + 16 * j, _mm512_add_ps(a[j], _mm512_loadu_ps(bias + n + 16 * j))); \
            }                                                                                                 \
            for (; n + 32 <= N; n += 32) NAME##_tile32(1, K, N, n, xr, w, bias, yr);                          \
            if (n < N) NAME##_tile16(1, K, N, n, xr, w, bias, yr);                                            \
        }                                                                                                     \
    }
#endif

#ifdef __AVX512F__
DEFINE_MM(mm_f16, uint16_t, LOAD16_F16)
DEFINE_MM(mm_f32, float, LOAD16_F32)
#else
DEFINE_MM(mm_f16, uint16_t, LOAD_F16)
DEFINE_MM(mm_f32, float, LOAD_F32)
#endif

static void matmul(int half, int rows, int K, int N, const float *x, const void *w, const float *bias, float *y) {
    if (half)
        mm_f16(rows, K, N, x, (const uint16_t *)w, bias, y);
    else
        mm_f32(rows, K, N, x, (const float *)w, bias, y);
}

/* LayerNorm of one row of C (two passes, biased variance, as torch) */
static void layer_norm(int C, const float *x, const float *g, const float *bta, float *y) {
    float mean = 0.f, var = 0.f;
    for (int i = 0; i < C; i++) mean += x[i];
    mean /= (float)C;
    for (int i = 0; i < C; i++) {
        float d = x[i] - mean;
        var += d * d;
    }
    float rstd = 1.0f / sqrtf(var / (float)C + LN_EPS);
    for (int i = 0; i < C; i++) y[i] = (x[i] - mean) * rstd * g[i] + bta[i];
}

/* GELU (tanh) in place, n % 8 == 0: 0.5 x (1 + tanh(u)), tanh(u) = 1 - 2 / (exp(2u) + 1) */
static void gelu_tanh(int n, float *x) {
    const __m256 k0 = _mm256_set1_ps(0.7978845608028654f), k1 = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
    for (int i = 0; i < n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 u = _mm256_mul_ps(k0, _mm256_add_ps(v, _mm256_mul_ps(k1, _mm256_mul_ps(v, _mm256_mul_ps(v, v)))));
        __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8(_mm256_mul_ps(two, u)), one)));
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t)));
    }
}

/* ---- attention over one row's cache, keys/values stored as KT (float32, or float16 converted on load) ---- */
#define DEFINE_ATTEND(SCORES8, ATTEND, KT, LOADK)                                                             \
    /* s[0..8) = (q . K[j]) * scale for the 8 rows of K from kj; hd % 8 == 0 */                               \
    static inline __m256 SCORES8(int hd, const float *q, const KT *kj, __m256 scale) {                        \
        __m256 a[8];                                                                                          \
        for (int t = 0; t < 8; t++) a[t] = _mm256_mul_ps(_mm256_loadu_ps(q), LOADK(kj + (size_t)t * hd));     \
        for (int d = 8; d < hd; d += 8) {                                                                     \
            __m256 qd = _mm256_loadu_ps(q + d);                                                               \
            for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(qd, LOADK(kj + (size_t)t * hd + d), a[t]);     \
        }                                                                                                     \
        __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));                   \
        __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));                   \
        __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)); \
        return _mm256_mul_ps(sum, scale);                                                                     \
    }                                                                                                         \
    /* One head of one row: out (hd) = softmax(q . K[0..n) * scale) @ V[0..n); K, V (n, hd) contiguous.      \
       The keys' scores go 8 at a time, the tail (n % 8) padded with copies of the last key (scores dropped). */ \
    static void ATTEND(int n, int hd, float scale, const float *q, const KT *K, const KT *V, float *s, float *out) { \
        const __m256 sc = _mm256_set1_ps(scale);                                                              \
        __m256 mx8 = _mm256_set1_ps(-INFINITY);                                                               \
        const size_t row_bytes = (size_t)hd * sizeof(KT);                                                     \
        int j = 0;                                                                                            \
        for (; j + 8 <= n; j += 8) {                                                                          \
            /* fetch these keys' values now, while the keys stream in: the value pass then reads from cache */ \
            for (const char *pv = (const char *)(V + (size_t)j * hd), *end = pv + 8 * row_bytes; pv < end; pv += 64) \
                _mm_prefetch(pv, _MM_HINT_T0);                                                                \
            for (const char *pk = (const char *)(K + (size_t)(j + 16) * hd), *end = pk + 8 * row_bytes;       \
                 j + 24 <= n && pk < end; pk += 64)                                                           \
                _mm_prefetch(pk, _MM_HINT_T0);                                                                \
            __m256 v = SCORES8(hd, q, K + (size_t)j * hd, sc);                                                \
            _mm256_storeu_ps(s + j, v);                                                                       \
            mx8 = _mm256_max_ps(mx8, v);                                                                      \
        }                                                                                                     \
        if (j < n) {                                                                                          \
            KT pad[8 * 256];                                                                                  \
            const KT *src = K + (size_t)j * hd;                                                               \
            int m = n - j;                                                                                    \
            for (int t = 0; t < 8; t++) memcpy(pad + (size_t)t * hd, src + (size_t)(t < m ? t : m - 1) * hd, row_bytes); \
            float t8[8];                                                                                      \
            _mm256_storeu_ps(t8, SCORES8(hd, q, pad, sc));                                                    \
            for (int t = 0; t < m; t++) s[j + t] = t8[t];                                                     \
        }                                                                                                     \
        float tmp[8];                                                                                         \
        _mm256_storeu_ps(tmp, mx8);                                                                           \
        float mx = -INFINITY;                                                                                 \
        for (int t = 0; t < 8; t++) mx = tmp[t] > mx ? tmp[t] : mx;                                           \
        for (int t = j; t < n; t++) mx = s[t] > mx ? s[t] : mx;                                               \
        float sum = softmax_exp(n, s, mx);                                                                    \
        const __m256 inv = _mm256_set1_ps(1.0f / sum);                                                        \
        if (hd == 32) { /* the shipped model: 4 accumulators per key, two keys interleaved */                 \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;   \
            int t = 0;                                                                                        \
            for (; t + 2 <= n; t += 2) {                                                                      \
                const KT *v0 = V + (size_t)t * 32, *v1 = v0 + 32;                                             \
                __m256 p0 = _mm256_set1_ps(s[t]), p1 = _mm256_set1_ps(s[t + 1]);                              \
                a0 = _mm256_fmadd_ps(p0, LOADK(v0), a0);                                                      \
                a1 = _mm256_fmadd_ps(p0, LOADK(v0 + 8), a1);                                                  \
                a2 = _mm256_fmadd_ps(p0, LOADK(v0 + 16), a2);                                                 \
                a3 = _mm256_fmadd_ps(p0, LOADK(v0 + 24), a3);                                                 \
                b0 = _mm256_fmadd_ps(p1, LOADK(v1), b0);                                                      \
                b1 = _mm256_fmadd_ps(p1, LOADK(v1 + 8), b1);                                                  \
                b2 = _mm256_fmadd_ps(p1, LOADK(v1 + 16), b2);                                                 \
                b3 = _mm256_fmadd_ps(p1, LOADK(v1 + 24), b3);                                                 \
            }                                                                                                 \
            if (t < n) {                                                                                      \
                const KT *v0 = V + (size_t)t * 32;                                                            \
                __m256 p0 = _mm256_set1_ps(s[t]);                                                             \
                a0 = _mm256_fmadd_ps(p0, LOADK(v0), a0);                                                      \
                a1 = _mm256_fmadd_ps(p0, LOADK(v0 + 8), a1);                                                  \
                a2 = _mm256_fmadd_ps(p0, LOADK(v0 + 16), a2);                                                 \
                a3 = _mm256_fmadd_ps(p0, LOADK(v0 + 24), a3);                                                 \
            }                                                                                                 \
            _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_add_ps(a0, b0), inv));                                 \
            _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_add_ps(a1, b1), inv));                             \
            _mm256_storeu_ps(out + 16, _mm256_mul_ps(_mm256_add_ps(a2, b2), inv));                            \
            _mm256_storeu_ps(out + 24, _mm256_mul_ps(_mm256_add_ps(a3, b3), inv));                            \
            return;                                                                                           \
        }                                                                                                     \
        for (int d = 0; d < hd; d += 8) {                                                                     \
            __m256 acc = _mm256_setzero_ps();                                                                 \
            for (int t = 0; t < n; t++) acc = _mm256_fmadd_ps(_mm256_set1_ps(s[t]), LOADK(V + (size_t)t * hd + d), acc); \
            _mm256_storeu_ps(out + d, _mm256_mul_ps(acc, inv));                                               \
        }                                                                                                     \
    }

/* s[0..n) = exp(s - mx), 8 at a time, the tail through the same vector exp; returns their sum */
static float softmax_exp(int n, float *s, float mx) {
    const __m256 m8 = _mm256_set1_ps(mx);
    __m256 sum8 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), m8));
        _mm256_storeu_ps(s + i, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = 0.f;
    if (i < n) {
        float t8[8] = {0};
        for (int t = i; t < n; t++) t8[t - i] = s[t] - mx;
        _mm256_storeu_ps(t8, exp8(_mm256_loadu_ps(t8)));
        for (int t = i; t < n; t++) {
            s[t] = t8[t - i];
            sum += t8[t - i];
        }
    }
    return sum + hsum8(sum8);
}

DEFINE_ATTEND(scores8_f32, attend_f32, float, LOAD_F32)
DEFINE_ATTEND(scores8_f16, attend_f16, uint16_t, LOAD_F16)

/* dst (n) = src as float16 (round to nearest even), n % 8 == 0 */
static void to_f16(int n, const float *src, uint16_t *dst) {
    for (int i = 0; i < n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
}


/* Where the update `f` (C) of part `part` (0 attention, 1 MLP) of block `layer` meets row `b`'s stream `x` (C), the
 * row at position `pos`: the one place the step applies the edits (model/edits.py's `apply` is the torch twin).
 * x + g f (residual), or where(g == 0, x, g f) (a plain stack); no gates: x + f / f. Then, after the MLP part (the
 * block's resid_post), the row's added vector for a prompt or a generated position (`pos` against n_prompt). */
static inline void edit_update(const ShortcutDims *d, const ShortcutEdits *e, int b, int layer, int part, int64_t pos,
                               float *x, const float *f) {
    const int C = d->d_model, residual = d->residual;
    const float *g = e->gates ? e->gates + ((size_t)b * d->n_layer + layer) * 2 + part : NULL;
    if (g == NULL) {
        for (int i = 0; i < C; i++) x[i] = residual ? x[i] + f[i] : f[i];
    } else if (residual) {
        float gv = *g;
        for (int i = 0; i < C; i++) x[i] = x[i] + gv * f[i];
    } else if (*g != 0.0f) {
        float gv = *g;
        for (int i = 0; i < C; i++) x[i] = gv * f[i];
    }
    if (part == 1 && e->add != NULL) {
        const float *v = e->add + (((size_t)b * d->n_layer + layer) * 2 + (pos >= e->n_prompt[b])) * C;
        for (int i = 0; i < C; i++) x[i] += v[i];
    }
}

/* One step (fused_step.h). The cache: (L, rows, nh, S, hd) with the given layer and row strides (elements); a row
 * stride of 0 makes every row share one cache row: rows go in order, each writing its key and value right before it
 * attends, so rows at positions 0..B-1 are a causal prefill of one sequence. A float16 cache (kv_half) halves the
 * bytes attention reads, the keys and values rounded once when written. */
int shortcut_fused_step(const ShortcutDims *d, const ShortcutWeights *w, const ShortcutStepArgs *a) {
    const int B = a->B, C = d->d_model, nh = d->n_head, L = d->n_layer, F = d->d_ff, V = d->vocab_size;
    const int S = d->block_size, half = d->half, R = a->R, kv_half = a->kv_half;
    const int64_t *tokens = a->tokens, *pos = a->pos, *trace_rows = a->trace_rows;
    float *stream = a->stream;
    for (int b = 0; b < B; b++) {
        if (tokens[b] < 0 || tokens[b] >= V) return SHORTCUT_EBAD_TOKEN;
        if (pos[b] < 0 || pos[b] >= S) return SHORTCUT_EBAD_POS;
    }
    for (int r = 0; r < R; r++)
        if (trace_rows[r] < 0 || trace_rows[r] >= B) return SHORTCUT_EBAD_TRACE;
    const int hd = C / nh, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)hd);
    float *buf = (float *)malloc(sizeof(float) * ((size_t)B * (3 * C + C3 + F) + S + V));
    if (buf == NULL) return SHORTCUT_ENOMEM;
    float *x = buf, *h = x + (size_t)B * C, *y = h + (size_t)B * C, *qkv = y + (size_t)B * C;
    float *ff = qkv + (size_t)B * C3, *sc = ff + (size_t)B * F;

    for (int b = 0; b < B; b++)
        for (int i = 0; i < C; i++) x[(size_t)b * C + i] = w->wte[tokens[b] * C + i] + w->wpe[pos[b] * C + i];
    for (int r = 0; r < R; r++) memcpy(stream + (size_t)r * C, x + (size_t)trace_rows[r] * C, sizeof(float) * C);

    const size_t kv_esz = kv_half ? 2 : 4;
    for (int l = 0; l < L; l++) {
        const ShortcutLayerWeights *lw = &w->layers[l];
        char *kl = (char *)a->k_cache + (size_t)l * a->layer_stride * kv_esz;
        char *vl = (char *)a->v_cache + (size_t)l * a->layer_stride * kv_esz;

        /* attention */
        for (int b = 0; b < B; b++) layer_norm(C, x + (size_t)b * C, lw->ln_1_w, lw->ln_1_b, h + (size_t)b * C);
        matmul(half, B, C, C3, h, lw->w_qkv, lw->b_qkv, qkv);
        for (int b = 0; b < B; b++) {
            const float *qr = qkv + (size_t)b * C3;
            int64_t p = pos[b];
            for (int hh = 0; hh < nh; hh++) {
                size_t off = ((size_t)b * a->row_stride + (size_t)hh * S * hd) * kv_esz;
                float *out = y + (size_t)b * C + hh * hd;
                if (kv_half) {
                    uint16_t *K = (uint16_t *)(kl + off), *Vh = (uint16_t *)(vl + off);
                    to_f16(hd, qr + C + hh * hd, K + (size_t)p * hd);
                    to_f16(hd, qr + 2 * C + hh * hd, Vh + (size_t)p * hd);
                    attend_f16((int)p + 1, hd, scale, qr + hh * hd, K, Vh, sc, out);
                } else {
                    float *K = (float *)(kl + off), *Vh = (float *)(vl + off);
                    memcpy(K + (size_t)p * hd, qr + C + hh * hd, sizeof(float) * hd);
                    memcpy(Vh + (size_t)p * hd, qr + 2 * C + hh * hd, sizeof(float) * hd);
                    attend_f32((int)p + 1, hd, scale, qr + hh * hd, K, Vh, sc, out);
                }
            }
        }
        matmul(half, B, C, C, y, lw->w_o, lw->b_o, h); /* h = F(x) of the attention part */
        for (int b = 0; b < B; b++) edit_update(d, &a->edits, b, l, 0, pos[b], x + (size_t)b * C, h + (size_t)b * C);

        /* MLP */
        for (int b = 0; b < B; b++) layer_norm(C, x + (size_t)b * C, lw->ln_2_w, lw->ln_2_b, h + (size_t)b * C);
        matmul(half, B, C, F, h, lw->w_fc, lw->b_fc, ff);
        gelu_tanh(B * F, ff);
        matmul(half, B, F, C, ff, lw->w_p, lw->b_p, y);
        for (int b = 0; b < B; b++) edit_update(d, &a->edits, b, l, 1, pos[b], x + (size_t)b * C, y + (size_t)b * C);
        for (int r = 0; r < R; r++)
            memcpy(stream + ((size_t)(l + 1) * R + r) * C, x + (size_t)trace_rows[r] * C, sizeof(float) * C);
    }
    for (int b = 0; b < B; b++) layer_norm(C, x + (size_t)b * C, w->ln_f_w, w->ln_f_b, h + (size_t)b * C);
    float *zero = sc + S; /* the unembedding has no bias */
    memset(zero, 0, sizeof(float) * V);
    mm_f32(B, C, V, h, w->unembed_t, zero, a->logits);
    free(buf);
    return SHORTCUT_OK;
}
