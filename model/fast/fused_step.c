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
 * that only the explicit FMAs fuse. Keys and values are cached as float32 or float16. int8 weights run an AVX2
 * kernel (vpmaddwd), or in the AVX-512 build on a CPU with AVX512_VNNI a VNNI one (vpdpbusd): the same int32 sums.
 */
#include "fused_step.h"

#include <immintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>
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
    LAYOUT_FIELD(ShortcutDims, weights),
    LAYOUT_FIELD(ShortcutDims, residual),
    LAYOUT_FIELD(ShortcutDims, int8_layout),
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
    LAYOUT_FIELD(ShortcutLayerWeights, s_qkv),
    LAYOUT_FIELD(ShortcutLayerWeights, s_o),
    LAYOUT_FIELD(ShortcutLayerWeights, s_fc),
    LAYOUT_FIELD(ShortcutLayerWeights, s_p),
    LAYOUT_FIELD(ShortcutLayerWeights, z_qkv),
    LAYOUT_FIELD(ShortcutLayerWeights, z_o),
    LAYOUT_FIELD(ShortcutLayerWeights, z_fc),
    LAYOUT_FIELD(ShortcutLayerWeights, z_p),
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
    LAYOUT_FIELD(ShortcutStepArgs, pool),
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
    static void NAME(int rows, int K, int N, int ld, const float *x, const WT *w, const float *bias, float *y) {     \
        int b = 0;                                                                                            \
        for (; b + 6 <= rows; b += 6) { /* 6 rows x 16 outputs: 12 sums in registers, the weights read once */ \
            const float *x0 = x + (size_t)b * K;                                                              \
            for (int n = 0; n < N; n += 16) {                                                                 \
                __m256 c[6][2];                                                                               \
                for (int r = 0; r < 6; r++) c[r][0] = c[r][1] = _mm256_setzero_ps();                          \
                const WT *wp = w + n;                                                                         \
                for (int k = 0; k < K; k++, wp += ld) {                                                        \
                    __m256 w0 = LOAD(wp), w1 = LOAD(wp + 8);                                                  \
                    for (int r = 0; r < 6; r++) {                                                             \
                        __m256 xb = _mm256_broadcast_ss(x0 + (size_t)r * K + k);                              \
                        c[r][0] = _mm256_fmadd_ps(xb, w0, c[r][0]);                                           \
                        c[r][1] = _mm256_fmadd_ps(xb, w1, c[r][1]);                                           \
                    }                                                                                         \
                }                                                                                             \
                __m256 b0 = _mm256_loadu_ps(bias + n), b1 = _mm256_loadu_ps(bias + n + 8);                    \
                for (int r = 0; r < 6; r++) {                                                                 \
                    float *yr = y + (size_t)(b + r) * ld + n;                                                  \
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
                for (int k = 0; k < K; k++, wp += ld) {                                                        \
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
                float *y0 = y + (size_t)b * ld + n;                                                            \
                _mm256_storeu_ps(y0, _mm256_add_ps(a00, b0)); _mm256_storeu_ps(y0 + 8, _mm256_add_ps(a01, b1)); \
                y0 += ld;                                                                                      \
                _mm256_storeu_ps(y0, _mm256_add_ps(a10, b0)); _mm256_storeu_ps(y0 + 8, _mm256_add_ps(a11, b1)); \
                y0 += ld;                                                                                      \
                _mm256_storeu_ps(y0, _mm256_add_ps(a20, b0)); _mm256_storeu_ps(y0 + 8, _mm256_add_ps(a21, b1)); \
                y0 += ld;                                                                                      \
                _mm256_storeu_ps(y0, _mm256_add_ps(a30, b0)); _mm256_storeu_ps(y0 + 8, _mm256_add_ps(a31, b1)); \
            }                                                                                                 \
        }                                                                                                     \
        for (; b < rows; b++) { /* one row: 64 outputs at a time (8 independent sums), then 16 */            \
            const float *xr = x + (size_t)b * K;                                                              \
            float *yr = y + (size_t)b * ld;                                                                    \
            int n = 0;                                                                                        \
            for (; n + 64 <= N; n += 64) {                                                                    \
                __m256 a[8];                                                                                  \
                for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();                                       \
                const WT *wp = w + n;                                                                         \
                for (int k = 0; k < K; k++, wp += ld) {                                                        \
                    __m256 xb = _mm256_broadcast_ss(xr + k);                                                  \
                    for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(xb, LOAD(wp + 8 * j), a[j]);           \
                }                                                                                             \
                for (int j = 0; j < 8; j++)                                                                   \
                    _mm256_storeu_ps(yr + n + 8 * j, _mm256_add_ps(a[j], _mm256_loadu_ps(bias + n + 8 * j))); \
            }                                                                                                 \
            for (; n < N; n += 16) {                                                                          \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0;                                                     \
                const WT *wp = w + n;                                                                         \
                for (int k = 0; k < K; k++, wp += ld) {                                                        \
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
    static inline __attribute__((always_inline)) void NAME##_tile32(int R, int K, int ld, int n, const float *x0, \
                                                                    const WT *w, const float *bias, float *y0) { \
        __m512 c[8][2];                                                                                       \
        for (int r = 0; r < R; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();                                  \
        const WT *wp = w + n;                                                                                 \
        for (int k = 0; k < K; k++, wp += ld) {                                                                \
            __m512 w0 = LOAD(wp), w1 = LOAD(wp + 16);                                                         \
            for (int r = 0; r < R; r++) {                                                                     \
                __m512 xb = _mm512_set1_ps(x0[(size_t)r * K + k]);                                            \
                c[r][0] = _mm512_fmadd_ps(xb, w0, c[r][0]);                                                   \
                c[r][1] = _mm512_fmadd_ps(xb, w1, c[r][1]);                                                   \
            }                                                                                                 \
        }                                                                                                     \
        __m512 b0 = _mm512_loadu_ps(bias + n), b1 = _mm512_loadu_ps(bias + n + 16);                           \
        for (int r = 0; r < R; r++) {                                                                         \
            _mm512_storeu_ps(y0 + (size_t)r * ld + n, _mm512_add_ps(c[r][0], b0));                             \
            _mm512_storeu_ps(y0 + (size_t)r * ld + n + 16, _mm512_add_ps(c[r][1], b1));                        \
        }                                                                                                     \
    }                                                                                                         \
    /* R rows x 16 outputs from column n (the last 16 when N % 32 == 16) */                                   \
    static inline __attribute__((always_inline)) void NAME##_tile16(int R, int K, int ld, int n, const float *x0, \
                                                                    const WT *w, const float *bias, float *y0) { \
        __m512 c[8];                                                                                          \
        for (int r = 0; r < R; r++) c[r] = _mm512_setzero_ps();                                               \
        const WT *wp = w + n;                                                                                 \
        for (int k = 0; k < K; k++, wp += ld) {                                                                \
            __m512 w0 = LOAD(wp);                                                                             \
            for (int r = 0; r < R; r++) c[r] = _mm512_fmadd_ps(_mm512_set1_ps(x0[(size_t)r * K + k]), w0, c[r]); \
        }                                                                                                     \
        __m512 b0 = _mm512_loadu_ps(bias + n);                                                                \
        for (int r = 0; r < R; r++) _mm512_storeu_ps(y0 + (size_t)r * ld + n, _mm512_add_ps(c[r], b0));        \
    }                                                                                                         \
    static void NAME##_rows(int R, int K, int N, int ld, const float *x0, const WT *w, const float *bias, float *y0) { \
        int n = 0;                                                                                            \
        for (; n + 32 <= N; n += 32) NAME##_tile32(R, K, ld, n, x0, w, bias, y0);                              \
        if (n < N) NAME##_tile16(R, K, ld, n, x0, w, bias, y0);                                                \
    }                                                                                                         \
    static void NAME(int rows, int K, int N, int ld, const float *x, const WT *w, const float *bias, float *y) {     \
        int b = 0;                                                                                            \
        for (; b + 8 <= rows; b += 8) NAME##_rows(8, K, N, ld, x + (size_t)b * K, w, bias, y + (size_t)b * ld);    \
        if (b + 4 <= rows) {                                                                                  \
            NAME##_rows(4, K, N, ld, x + (size_t)b * K, w, bias, y + (size_t)b * ld);                              \
            b += 4;                                                                                           \
        }                                                                                                     \
        for (; b < rows; b++) { /* one row: 128 outputs at a time (8 independent sums), then 32, 16 */       \
            const float *xr = x + (size_t)b * K;                                                              \
            float *yr = y + (size_t)b * ld;                                                                    \
            int n = 0;                                                                                        \
            for (; n + 128 <= N; n += 128) {                                                                  \
                __m512 a[8];                                                                                  \
                for (int j = 0; j < 8; j++) a[j] = _mm512_setzero_ps();                                       \
                const WT *wp = w + n;                                                                         \
                for (int k = 0; k < K; k++, wp += ld) {                                                        \
                    __m512 xb = _mm512_set1_ps(xr[k]);                                                        \
                    for (int j = 0; j < 8; j++) a[j] = _mm512_fmadd_ps(xb, LOAD(wp + 16 * j), a[j]);          \
                }                                                                                             \
                for (int j = 0; j < 8; j++)                                                                   \
                    _mm512_storeu_ps(yr + n + 16 * j, _mm512_add_ps(a[j], _mm512_loadu_ps(bias + n + 16 * j))); \
            }                                                                                                 \
            for (; n + 32 <= N; n += 32) NAME##_tile32(1, K, ld, n, xr, w, bias, yr);                          \
            if (n < N) NAME##_tile16(1, K, ld, n, xr, w, bias, yr);                                            \
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

/* ---- int8 weights: y (rows, N) = (xq (rows, K) . Wq (K, N)) * (sx[row] sw[col]) + bias, exact int32 sums ----
 * Wq is packed (K/2, ld, 2): the two weights of a k pair side by side for each column, so one 16-byte load widened
 * to int16 (vpmovsxbw) meets a broadcast (x[2i], x[2i+1]) pair in vpmaddwd: 8 columns' x[2i] w + x[2i+1] w as int32,
 * no saturation (|x|, |w| <= 127, K * 127^2 << 2^31). vpmaddubsw (u8 x s8, twice the products per instruction) is
 * not used: with the +128 offset on x a pair of products overflows int16 and saturates. Integer sums do not depend
 * on their order, and each output's float epilogue is the same in every tile (and both builds): rows stay
 * independent of their batch. The AVX-512 build runs these same AVX2 kernels where the CPU has no VNNI; where it has
 * (AVX512_VNNI + AVX512VL), the VNNI kernels below, which give the same int32 sums and so the same bits. */
static inline __attribute__((always_inline)) void i8_tile16(const int R, int K, int ld, int n, const int16_t *xq,
                                                            const float *sx, const int8_t *w, const float *sw,
                                                            const float *bias, float *y) {
    __m256i c[6][2];
    for (int r = 0; r < R; r++) c[r][0] = c[r][1] = _mm256_setzero_si256();
    const int8_t *wp = w + (size_t)n * 2;
    const int32_t *xp = (const int32_t *)xq; /* k pairs */
    for (int i = 0; i < K / 2; i++, wp += (size_t)ld * 2) {
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wp));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wp + 16)));
        for (int r = 0; r < R; r++) {
            __m256i xb = _mm256_set1_epi32(xp[(size_t)r * (K / 2) + i]);
            c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(xb, w0));
            c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(xb, w1));
        }
    }
    __m256 s0 = _mm256_loadu_ps(sw + n), s1 = _mm256_loadu_ps(sw + n + 8);
    __m256 b0 = _mm256_loadu_ps(bias + n), b1 = _mm256_loadu_ps(bias + n + 8);
    for (int r = 0; r < R; r++) {
        __m256 xs = _mm256_set1_ps(sx[r]);
        float *yr = y + (size_t)r * ld + n;
        _mm256_storeu_ps(yr, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[r][0]), _mm256_mul_ps(xs, s0), b0));
        _mm256_storeu_ps(yr + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[r][1]), _mm256_mul_ps(xs, s1), b1));
    }
}

/* one row, 64 columns from n: 8 independent sums */
static inline void i8_row64(int K, int ld, int n, const int16_t *xq, float sx, const int8_t *w, const float *sw,
                            const float *bias, float *y) {
    __m256i c[8];
    for (int j = 0; j < 8; j++) c[j] = _mm256_setzero_si256();
    const int8_t *wp = w + (size_t)n * 2;
    const int32_t *xp = (const int32_t *)xq;
    for (int i = 0; i < K / 2; i++, wp += (size_t)ld * 2) {
        __m256i xb = _mm256_set1_epi32(xp[i]);
        for (int j = 0; j < 8; j++)
            c[j] = _mm256_add_epi32(
                c[j], _mm256_madd_epi16(xb, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wp + 16 * j)))));
    }
    __m256 xs = _mm256_set1_ps(sx);
    for (int j = 0; j < 8; j++)
        _mm256_storeu_ps(y + n + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[j]),
                                                        _mm256_mul_ps(xs, _mm256_loadu_ps(sw + n + 8 * j)),
                                                        _mm256_loadu_ps(bias + n + 8 * j)));
}

/* columns [n0, n1) (multiples of 16) of every row */
static void mm_i8(int rows, int K, int n0, int n1, int ld, const int16_t *xq, const float *sx, const int8_t *w,
                  const float *sw, const float *bias, float *y) {
    int b = 0;
    for (; b + 6 <= rows; b += 6)
        for (int n = n0; n < n1; n += 16)
            i8_tile16(6, K, ld, n, xq + (size_t)b * K, sx + b, w, sw, bias, y + (size_t)b * ld);
    for (; b + 4 <= rows; b += 4)
        for (int n = n0; n < n1; n += 16)
            i8_tile16(4, K, ld, n, xq + (size_t)b * K, sx + b, w, sw, bias, y + (size_t)b * ld);
    for (; b < rows; b++) {
        int n = n0;
        for (; n + 64 <= n1; n += 64) i8_row64(K, ld, n, xq + (size_t)b * K, sx[b], w, sw, bias, y + (size_t)b * ld);
        for (; n < n1; n += 16) i8_tile16(1, K, ld, n, xq + (size_t)b * K, sx + b, w, sw, bias, y + (size_t)b * ld);
    }
}

/* Each row of x (rows, K) quantized alone: sx = max|x| / 127, xq = round(x / sx) (nearest even) in [-127, 127];
 * a row of zeros gets sx = 0. K % 16 == 0. Stored as int16 (the pairs kernels), or with `u8` as the unsigned bytes
 * xq + 128 in [1, 255] (the VNNI kernels), the same levels either way. */
static void quantize_rows(int rows, int K, const float *x, int16_t *xq, float *sx, int u8) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < rows; b++) {
        const float *xr = x + (size_t)b * K;
        __m256 m = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k)));
        float tmp[8], amax = 0.f;
        _mm256_storeu_ps(tmp, m);
        for (int t = 0; t < 8; t++) amax = tmp[t] > amax ? tmp[t] : amax;
        sx[b] = amax / 127.0f;
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.0f / amax : 0.f);
        const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
        int16_t *qr = xq + (size_t)b * K;
        uint8_t *ur = (uint8_t *)xq + (size_t)b * K;
        for (int k = 0; k < K; k += 16) {
            __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), inv));
            __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), inv));
            q0 = _mm256_min_epi32(_mm256_max_epi32(q0, lo), hi);
            q1 = _mm256_min_epi32(_mm256_max_epi32(q1, lo), hi);
            /* packs works per 128-bit lane: [q0 lo, q1 lo, q0 hi, q1 hi] -> put the 64-bit quarters back in order */
            __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);
            if (!u8) {
                _mm256_storeu_si256((__m256i *)(qr + k), p);
                continue;
            }
            p = _mm256_add_epi16(p, _mm256_set1_epi16(128)); /* [1, 255]: packus keeps every value */
            _mm_storeu_si128((__m128i *)(ur + k),
                             _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
        }
    }
}

/* ---- int8 weights through VNNI: the same y, the same int32 sums, four inputs per instruction ----
 * vpdpbusd multiplies unsigned bytes by signed bytes and adds each 32-bit lane's four products to it (no saturation).
 * The activations go as u = xq + 128 in [1, 255] (quantize_rows with u8), the weights packed as quads (K/4, ld, 4):
 * the four weights of inputs 4i..4i+3 side by side for each column, so one 32-byte load holds 8 columns' quads and a
 * broadcast quad of u meets them in one vpdpbusd. sum_k u[k] w[k][n] = sum_k xq[k] w[k][n] + 128 sum_k w[k][n]: the
 * second term is each column's z (128 times its column sum, packed with the weights) and is subtracted once after the
 * sums. Every intermediate is an exact int32 (|sum| <= K * 255 * 127 < 2^31 for K < 66,000), so the int32 sums equal
 * the pairs kernels' and the float epilogue is theirs: the same bits. 256 bits wide (AVX512VL) for the same 16-column
 * tiles as i8_tile16 (and 6 rows x 2 sums in registers).
 *
 * Built into the AVX-512 library (the functions alone compiled for AVX512_VNNI) and run only where the CPU reports
 * AVX512_VNNI and AVX512VL (vnni_runs, asked through shortcut_fused_int8_layout by the packer). The machine this was
 * written on has no VNNI, nor does its QEMU emulate it, so the kernels are verified there through a test build
 * (build.py's `avx2-vnni-emulated`, -DSHORTCUT_EMULATE_VNNI) in which `dpbusd` is the plain scalar loop below; the
 * kernels around it are the same source. Their speed is unmeasured; on a VNNI machine
 * `pytest tests/model/test_fused_vnni.py` runs the real instruction against the AVX2 build, bit for bit. */
#if defined(SHORTCUT_EMULATE_VNNI) || defined(__AVX512F__)
#define HAVE_VNNI_KERNEL 1
#ifdef SHORTCUT_EMULATE_VNNI
#define VNNI_TARGET
/* vpdpbusd's definition: per 32-bit lane i, acc + sum_j a[4i + j] (u8) * b[4i + j] (s8), wrapping at 32 bits */
static inline __m256i dpbusd(__m256i acc, __m256i a, __m256i b) {
    uint32_t s[8];
    uint8_t ua[32];
    int8_t sb[32];
    _mm256_storeu_si256((__m256i *)s, acc);
    _mm256_storeu_si256((__m256i *)ua, a);
    _mm256_storeu_si256((__m256i *)sb, b);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 4; j++) s[i] += (uint32_t)((int32_t)ua[4 * i + j] * (int32_t)sb[4 * i + j]);
    return _mm256_loadu_si256((const __m256i *)s);
}
#else
#define VNNI_TARGET __attribute__((target("avx512vnni,avx512vl")))
#define dpbusd(acc, a, b) _mm256_dpbusd_epi32(acc, a, b)
#endif

static int vnni_runs(void) {
#ifdef SHORTCUT_EMULATE_VNNI
    return 1;
#else
    static atomic_int known = -1;
    int v = atomic_load_explicit(&known, memory_order_relaxed);
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
        atomic_store_explicit(&known, v, memory_order_relaxed);
    }
    return v;
#endif
}

static inline int32_t load_quad(const uint8_t *p) { /* four bytes as one int32 lane (memcpy: no aliasing) */
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* R rows x 16 columns from n: as i8_tile16, a quad of inputs per step */
VNNI_TARGET static inline __attribute__((always_inline)) void u8_tile16(const int R, int K, int ld, int n,
                                                                        const uint8_t *xu, const float *sx,
                                                                        const int8_t *w, const int32_t *z,
                                                                        const float *sw, const float *bias, float *y) {
    __m256i c[6][2];
    for (int r = 0; r < R; r++) c[r][0] = c[r][1] = _mm256_setzero_si256();
    const int8_t *wp = w + (size_t)n * 4;
    for (int i = 0; i < K / 4; i++, wp += (size_t)ld * 4) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)wp), w1 = _mm256_loadu_si256((const __m256i *)(wp + 32));
        for (int r = 0; r < R; r++) {
            __m256i xb = _mm256_set1_epi32(load_quad(xu + (size_t)r * K + 4 * i));
            c[r][0] = dpbusd(c[r][0], xb, w0);
            c[r][1] = dpbusd(c[r][1], xb, w1);
        }
    }
    __m256i z0 = _mm256_loadu_si256((const __m256i *)(z + n)), z1 = _mm256_loadu_si256((const __m256i *)(z + n + 8));
    __m256 s0 = _mm256_loadu_ps(sw + n), s1 = _mm256_loadu_ps(sw + n + 8);
    __m256 b0 = _mm256_loadu_ps(bias + n), b1 = _mm256_loadu_ps(bias + n + 8);
    for (int r = 0; r < R; r++) {
        __m256 xs = _mm256_set1_ps(sx[r]);
        float *yr = y + (size_t)r * ld + n;
        __m256i q0 = _mm256_sub_epi32(c[r][0], z0), q1 = _mm256_sub_epi32(c[r][1], z1);
        _mm256_storeu_ps(yr, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), _mm256_mul_ps(xs, s0), b0));
        _mm256_storeu_ps(yr + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), _mm256_mul_ps(xs, s1), b1));
    }
}

/* one row, 64 columns from n: 8 independent sums (as i8_row64) */
VNNI_TARGET static inline void u8_row64(int K, int ld, int n, const uint8_t *xu, float sx, const int8_t *w,
                                        const int32_t *z, const float *sw, const float *bias, float *y) {
    __m256i c[8];
    for (int j = 0; j < 8; j++) c[j] = _mm256_setzero_si256();
    const int8_t *wp = w + (size_t)n * 4;
    for (int i = 0; i < K / 4; i++, wp += (size_t)ld * 4) {
        __m256i xb = _mm256_set1_epi32(load_quad(xu + 4 * i));
        for (int j = 0; j < 8; j++) c[j] = dpbusd(c[j], xb, _mm256_loadu_si256((const __m256i *)(wp + 32 * j)));
    }
    __m256 xs = _mm256_set1_ps(sx);
    for (int j = 0; j < 8; j++) {
        __m256i q = _mm256_sub_epi32(c[j], _mm256_loadu_si256((const __m256i *)(z + n + 8 * j)));
        _mm256_storeu_ps(y + n + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q),
                                                        _mm256_mul_ps(xs, _mm256_loadu_ps(sw + n + 8 * j)),
                                                        _mm256_loadu_ps(bias + n + 8 * j)));
    }
}

/* columns [n0, n1) (multiples of 16) of every row: the tiles of mm_i8 */
VNNI_TARGET static void mm_u8(int rows, int K, int n0, int n1, int ld, const uint8_t *xu, const float *sx,
                              const int8_t *w, const int32_t *z, const float *sw, const float *bias, float *y) {
    int b = 0;
    for (; b + 6 <= rows; b += 6)
        for (int n = n0; n < n1; n += 16)
            u8_tile16(6, K, ld, n, xu + (size_t)b * K, sx + b, w, z, sw, bias, y + (size_t)b * ld);
    for (; b + 4 <= rows; b += 4)
        for (int n = n0; n < n1; n += 16)
            u8_tile16(4, K, ld, n, xu + (size_t)b * K, sx + b, w, z, sw, bias, y + (size_t)b * ld);
    for (; b < rows; b++) {
        int n = n0;
        for (; n + 64 <= n1; n += 64) u8_row64(K, ld, n, xu + (size_t)b * K, sx[b], w, z, sw, bias, y + (size_t)b * ld);
        for (; n < n1; n += 16)
            u8_tile16(1, K, ld, n, xu + (size_t)b * K, sx + b, w, z, sw, bias, y + (size_t)b * ld);
    }
}

VNNI_TARGET static void dpbusd_n(int n, const int32_t *acc, const uint8_t *a, const int8_t *b, int32_t *out) {
    for (int i = 0; i < n; i += 8) {
        __m256i r = dpbusd(_mm256_loadu_si256((const __m256i *)(acc + i)), _mm256_loadu_si256((const __m256i *)(a + 4 * i)),
                           _mm256_loadu_si256((const __m256i *)(b + 4 * i)));
        _mm256_storeu_si256((__m256i *)(out + i), r);
    }
}
#else
static int vnni_runs(void) { return 0; }
#endif

int shortcut_fused_int8_layout(void) { return vnni_runs() ? SHORTCUT_INT8_QUADS : SHORTCUT_INT8_PAIRS; }

int shortcut_fused_dpbusd(int n, const int32_t *acc, const uint8_t *a, const int8_t *b, int32_t *out) {
#ifdef HAVE_VNNI_KERNEL
    if (vnni_runs() && n >= 0 && n % 8 == 0) {
        dpbusd_n(n, acc, a, b, out);
        return 0;
    }
#else
    (void)n, (void)acc, (void)a, (void)b, (void)out;
#endif
    return -1;
}

/* A matrix's input as the format needs it: int8 weights take the rows quantized (once per input, then any columns) */
typedef struct {
    const float *x;
    int16_t *xq; /* int16 levels, or (quads) the bytes xq + 128 */
    float *sx;
    int quads; /* the int8 matrices are quads (the VNNI kernels) */
} MatIn;

static void mat_in(int fmt, int rows, int K, MatIn *in) {
    if (fmt == SHORTCUT_WEIGHTS_INT8) quantize_rows(rows, K, in->x, in->xq, in->sx, in->quads);
}

/* A block matrix as the layer's fields point at it: the weights, and for int8 the scales (and the quads' z) */
typedef struct {
    const void *w;
    const float *s;
    const int32_t *z;
} Mat;

/* y[:, n0:n1) = x @ W[:, n0:n1) + bias[n0:n1) for every row; W (K, ld) in `fmt`; y rows `ld` apart; n0, n1 % 16 == 0 */
static void matmul(int fmt, int rows, int K, int n0, int n1, int ld, const MatIn *in, Mat m, const float *bias,
                   float *y) {
    if (n1 <= n0) return;
#ifdef HAVE_VNNI_KERNEL
    if (fmt == SHORTCUT_WEIGHTS_INT8 && in->quads) {
        mm_u8(rows, K, n0, n1, ld, (const uint8_t *)in->xq, in->sx, (const int8_t *)m.w, m.z, m.s, bias, y);
        return;
    }
#endif
    if (fmt == SHORTCUT_WEIGHTS_INT8)
        mm_i8(rows, K, n0, n1, ld, in->xq, in->sx, (const int8_t *)m.w, m.s, bias, y);
    else if (fmt == SHORTCUT_WEIGHTS_F16)
        mm_f16(rows, K, n1 - n0, ld, in->x, (const uint16_t *)m.w + n0, bias + n0, y + n0);
    else
        mm_f32(rows, K, n1 - n0, ld, in->x, (const float *)m.w + n0, bias + n0, y + n0);
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

/* ---- the thread pool: persistent workers, woken per step, spinning briefly before they sleep on a futex ---- */
#define SPIN_ITERS 4000 /* ~0.1 ms of pause instructions before a waiter sleeps (a step's phases are shorter) */

static void futex_wait(atomic_int *word, int old) { syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, old, NULL, NULL, 0); }
static void futex_wake_all(atomic_int *word) { syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0); }

/* Wait until *word != old: spin, then sleep (`sleepers` counts the sleepers so that wakers skip the syscall) */
static void wait_change(atomic_int *word, int old, atomic_int *sleepers) {
    for (int i = 0; i < SPIN_ITERS; i++) {
        if (atomic_load_explicit(word, memory_order_acquire) != old) return;
        _mm_pause();
    }
    while (atomic_load(word) == old) {
        atomic_fetch_add(sleepers, 1);
        futex_wait(word, old); /* returns at once if *word is no longer old */
        atomic_fetch_sub(sleepers, 1);
    }
}

static void bump_and_wake(atomic_int *word, atomic_int *sleepers) {
    atomic_fetch_add(word, 1);
    if (atomic_load(sleepers) > 0) futex_wake_all(word);
}

struct ShortcutPool {
    int n; /* threads, the caller's included */
    pthread_t *threads;
    void (*fn)(void *, int, int);
    void *arg;
    atomic_int job, job_sleepers;   /* generation of the job to run; bumped to start one */
    atomic_int done, done_sleepers; /* workers done with the current job (bumped by each) */
    atomic_int bar_count, bar_gen, bar_sleepers;
    atomic_int stop;
    pthread_mutex_t lock; /* one step at a time */
};
typedef struct ShortcutPool Pool;

typedef struct {
    Pool *pool;
    int tid;
} Worker;

static void *worker_main(void *p_) {
    Worker *me = (Worker *)p_;
    Pool *p = me->pool;
    int tid = me->tid, seen = 0;
    free(me);
    for (;;) {
        wait_change(&p->job, seen, &p->job_sleepers);
        seen = atomic_load(&p->job);
        if (atomic_load(&p->stop)) return NULL;
        p->fn(p->arg, tid, p->n);
        bump_and_wake(&p->done, &p->done_sleepers);
    }
}

/* Every thread of the running job waits here until all have come */
static void pool_barrier(Pool *p) {
    if (p == NULL || p->n == 1) return;
    int gen = atomic_load(&p->bar_gen);
    if (atomic_fetch_add(&p->bar_count, 1) == p->n - 1) {
        atomic_store(&p->bar_count, 0);
        bump_and_wake(&p->bar_gen, &p->bar_sleepers);
    } else {
        wait_change(&p->bar_gen, gen, &p->bar_sleepers);
    }
}

/* fn(arg, tid, n) on every thread (the caller is thread 0); returns when all are done */
static void pool_run(Pool *p, void (*fn)(void *, int, int), void *arg) {
    pthread_mutex_lock(&p->lock);
    unsigned before = (unsigned)atomic_load(&p->done);
    p->fn = fn;
    p->arg = arg;
    bump_and_wake(&p->job, &p->job_sleepers); /* seq_cst: the workers see fn and arg */
    fn(arg, 0, p->n);
    int target = (int)(before + (unsigned)(p->n - 1));
    for (int v; (v = atomic_load(&p->done)) != target;) wait_change(&p->done, v, &p->done_sleepers);
    pthread_mutex_unlock(&p->lock);
}

ShortcutPool *shortcut_fused_pool_new(int threads) {
    /* (on failure: shortcut_fused_pool_free stops the workers started so far) */
    if (threads < 2) return NULL;
    Pool *p = (Pool *)calloc(1, sizeof(Pool));
    if (p == NULL) return NULL;
    p->threads = (pthread_t *)calloc((size_t)threads, sizeof(pthread_t));
    if (p->threads == NULL) {
        free(p);
        return NULL;
    }
    p->n = threads;
    pthread_mutex_init(&p->lock, NULL);
    for (int t = 1; t < threads; t++) {
        Worker *w = (Worker *)malloc(sizeof(Worker));
        if (w != NULL) *w = (Worker){p, t};
        if (w == NULL || pthread_create(&p->threads[t], NULL, worker_main, w) != 0) {
            free(w);
            p->n = t; /* the workers started so far: stop them */
            shortcut_fused_pool_free(p);
            return NULL;
        }
    }
    return p;
}

int shortcut_fused_pool_threads(const ShortcutPool *p) { return p == NULL ? 1 : p->n; }

void shortcut_fused_pool_free(ShortcutPool *p) {
    if (p == NULL) return;
    atomic_store(&p->stop, 1);
    bump_and_wake(&p->job, &p->job_sleepers);
    for (int t = 1; t < p->n; t++) pthread_join(p->threads[t], NULL);
    pthread_mutex_destroy(&p->lock);
    free(p->threads);
    free(p);
}

/* ---- the step ---- */
typedef struct {
    const ShortcutDims *d;
    const ShortcutWeights *w;
    const ShortcutStepArgs *a;
    Pool *pool;
    char *scratch; /* per thread: `per_thread` bytes each */
    size_t per_thread;
    float *shared; /* the column split's shared buffers */
} Step;

/* Per-thread scratch for `rows` rows (bytes): x, h, y, qkv, ff, the attention scores, the unembedding's zero bias,
 * and the quantized input of a matrix */
static size_t scratch_bytes(const ShortcutDims *d, int rows) {
    const size_t C = d->d_model, F = d->d_ff, K = F > C ? F : C;
    size_t floats = (size_t)rows * (3 * C + 3 * C + F) + d->block_size + d->vocab_size + rows;
    return floats * sizeof(float) + (size_t)rows * K * sizeof(int16_t) + 64;
}

typedef struct {
    float *x, *h, *y, *qkv, *ff, *sc, *zero;
    MatIn in;
} Scratch;

static Scratch carve(const ShortcutDims *d, int rows, char *base) {
    const size_t C = d->d_model, F = d->d_ff;
    Scratch s;
    s.x = (float *)base;
    s.h = s.x + rows * C;
    s.y = s.h + rows * C;
    s.qkv = s.y + rows * C;
    s.ff = s.qkv + rows * 3 * C;
    s.sc = s.ff + rows * F;
    s.zero = s.sc + d->block_size;
    s.in.sx = s.zero + d->vocab_size;
    s.in.xq = (int16_t *)(s.in.sx + rows);
    s.in.x = NULL;
    s.in.quads = d->weights == SHORTCUT_WEIGHTS_INT8 && d->int8_layout == SHORTCUT_INT8_QUADS;
    memset(s.zero, 0, sizeof(float) * d->vocab_size); /* the unembedding has no bias */
    return s;
}

static Mat mat(const ShortcutLayerWeights *lw, int which) {
    switch (which) {
    case 0: return (Mat){lw->w_qkv, lw->s_qkv, lw->z_qkv};
    case 1: return (Mat){lw->w_o, lw->s_o, lw->z_o};
    case 2: return (Mat){lw->w_fc, lw->s_fc, lw->z_fc};
    default: return (Mat){lw->w_p, lw->s_p, lw->z_p};
    }
}

/* Row b's head hh at position p: write its key and value into the cache, then attend over positions 0..p */
static void attend_head(const Step *st, int b, int hh, const float *qr, float *sc, float *out, char *kl, char *vl) {
    const ShortcutDims *d = st->d;
    const ShortcutStepArgs *a = st->a;
    const int C = d->d_model, S = d->block_size, hd = C / d->n_head;
    const size_t kv_esz = a->kv_half ? 2 : 4;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t p = a->pos[b];
    size_t off = ((size_t)b * a->row_stride + (size_t)hh * S * hd) * kv_esz;
    if (a->kv_half) {
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

static void embed_rows(const Step *st, int b0, int n, float *x) {
    const int C = st->d->d_model;
    for (int i = 0; i < n; i++) {
        int64_t t = st->a->tokens[b0 + i], p = st->a->pos[b0 + i];
        for (int c = 0; c < C; c++) x[(size_t)i * C + c] = st->w->wte[t * C + c] + st->w->wpe[p * C + c];
    }
}

/* The traced rows among [b0, b0 + n) into the stream at slot `at` (0: before block 0, l + 1: after block l) */
static void trace_rows(const Step *st, int b0, int n, int at, const float *x) {
    const ShortcutStepArgs *a = st->a;
    const int C = st->d->d_model;
    for (int r = 0; r < a->R; r++)
        if (a->trace_rows[r] >= b0 && a->trace_rows[r] < b0 + n)
            memcpy(a->stream + ((size_t)at * a->R + r) * C, x + (size_t)(a->trace_rows[r] - b0) * C, sizeof(float) * C);
}

/* The whole step for rows [b0, b0 + n), alone (one thread, or one of the row split's): rows never meet, and each
 * row's numbers are those of any other split (every matrix output is one sum in a fixed order). */
static void step_rows(const Step *st, int b0, int n, char *buf) {
    if (n <= 0) return;
    const ShortcutDims *d = st->d;
    const ShortcutWeights *w = st->w;
    const ShortcutStepArgs *a = st->a;
    const int C = d->d_model, nh = d->n_head, L = d->n_layer, F = d->d_ff, V = d->vocab_size, C3 = 3 * C;
    const int fmt = d->weights;
    const size_t kv_esz = a->kv_half ? 2 : 4;
    Scratch s = carve(d, n, buf);
    embed_rows(st, b0, n, s.x);
    trace_rows(st, b0, n, 0, s.x);
    for (int l = 0; l < L; l++) {
        const ShortcutLayerWeights *lw = &w->layers[l];
        char *kl = (char *)a->k_cache + (size_t)l * a->layer_stride * kv_esz;
        char *vl = (char *)a->v_cache + (size_t)l * a->layer_stride * kv_esz;
        /* attention */
        for (int b = 0; b < n; b++) layer_norm(C, s.x + (size_t)b * C, lw->ln_1_w, lw->ln_1_b, s.h + (size_t)b * C);
        s.in.x = s.h;
        mat_in(fmt, n, C, &s.in);
        matmul(fmt, n, C, 0, C3, C3, &s.in, mat(lw, 0), lw->b_qkv, s.qkv);
        for (int b = 0; b < n; b++)
            for (int hh = 0; hh < nh; hh++)
                attend_head(st, b0 + b, hh, s.qkv + (size_t)b * C3, s.sc, s.y + (size_t)b * C + hh * (C / nh), kl, vl);
        s.in.x = s.y;
        mat_in(fmt, n, C, &s.in);
        matmul(fmt, n, C, 0, C, C, &s.in, mat(lw, 1), lw->b_o, s.h); /* h = F(x) of the attention part */
        for (int b = 0; b < n; b++)
            edit_update(d, &a->edits, b0 + b, l, 0, a->pos[b0 + b], s.x + (size_t)b * C, s.h + (size_t)b * C);
        /* MLP */
        for (int b = 0; b < n; b++) layer_norm(C, s.x + (size_t)b * C, lw->ln_2_w, lw->ln_2_b, s.h + (size_t)b * C);
        s.in.x = s.h;
        mat_in(fmt, n, C, &s.in);
        matmul(fmt, n, C, 0, F, F, &s.in, mat(lw, 2), lw->b_fc, s.ff);
        gelu_tanh(n * F, s.ff);
        s.in.x = s.ff;
        mat_in(fmt, n, F, &s.in);
        matmul(fmt, n, F, 0, C, C, &s.in, mat(lw, 3), lw->b_p, s.y);
        for (int b = 0; b < n; b++)
            edit_update(d, &a->edits, b0 + b, l, 1, a->pos[b0 + b], s.x + (size_t)b * C, s.y + (size_t)b * C);
        trace_rows(st, b0, n, l + 1, s.x);
    }
    for (int b = 0; b < n; b++) layer_norm(C, s.x + (size_t)b * C, w->ln_f_w, w->ln_f_b, s.h + (size_t)b * C);
    mm_f32(n, C, V, V, s.h, w->unembed_t, s.zero, a->logits + (size_t)b0 * V);
}

/* The row split: thread t takes a contiguous share of the rows */
static void rows_job(void *arg, int t, int T) {
    const Step *st = (const Step *)arg;
    int B = st->a->B, b0 = (int)((int64_t)B * t / T), b1 = (int)((int64_t)B * (t + 1) / T);
    step_rows(st, b0, b1 - b0, st->scratch + (size_t)t * st->per_thread);
}

/* [lo, hi) of `units` units for thread t of T */
static void share(int units, int t, int T, int *lo, int *hi) {
    *lo = (int)((int64_t)units * t / T);
    *hi = (int)((int64_t)units * (t + 1) / T);
}

/* The column split (one row, or a prefill's rows that share a cache row): every thread keeps its own copy of the
 * stream x (the same numbers: the same updates in the same order) and computes a share of each matrix's output
 * columns (16 at a time) and of the heads (each head's q, k, v columns, its cache and attention: the rows in order,
 * so a prefill's causal order holds per head). Four barriers per layer: after attention, the attention's output
 * projection, the MLP's up projection and its down projection. */
static void cols_job(void *arg, int t, int T) {
    const Step *st = (const Step *)arg;
    const ShortcutDims *d = st->d;
    const ShortcutWeights *w = st->w;
    const ShortcutStepArgs *a = st->a;
    const int B = a->B, C = d->d_model, nh = d->n_head, L = d->n_layer, F = d->d_ff, V = d->vocab_size, C3 = 3 * C;
    const int hd = C / nh, fmt = d->weights;
    const size_t kv_esz = a->kv_half ? 2 : 4;
    Scratch s = carve(d, B, st->scratch + (size_t)t * st->per_thread);
    float *y_att = st->shared, *h_att = y_att + (size_t)B * C, *ff = h_att + (size_t)B * C;
    float *y_mlp = ff + (size_t)B * F;
    const int hg = hd % 16 == 0 ? 1 : 2; /* heads per unit: a unit's columns are a multiple of 16 */
    int h0, h1, c0, c1, f0, f1, v0, v1;
    share(nh / hg, t, T, &h0, &h1);
    h0 *= hg, h1 *= hg;
    share(C / 16, t, T, &c0, &c1);
    share(F / 16, t, T, &f0, &f1);
    share(V / 16, t, T, &v0, &v1);
    c0 *= 16, c1 *= 16, f0 *= 16, f1 *= 16, v0 *= 16, v1 *= 16;
    embed_rows(st, 0, B, s.x);
    if (t == 0) trace_rows(st, 0, B, 0, s.x);
    for (int l = 0; l < L; l++) {
        const ShortcutLayerWeights *lw = &w->layers[l];
        char *kl = (char *)a->k_cache + (size_t)l * a->layer_stride * kv_esz;
        char *vl = (char *)a->v_cache + (size_t)l * a->layer_stride * kv_esz;
        for (int b = 0; b < B; b++) layer_norm(C, s.x + (size_t)b * C, lw->ln_1_w, lw->ln_1_b, s.h + (size_t)b * C);
        s.in.x = s.h;
        mat_in(fmt, B, C, &s.in);
        for (int part = 0; part < 3; part++) /* this thread's heads' q, k and v columns */
            matmul(fmt, B, C, part * C + h0 * hd, part * C + h1 * hd, C3, &s.in, mat(lw, 0), lw->b_qkv, s.qkv);
        for (int b = 0; b < B; b++)
            for (int hh = h0; hh < h1; hh++)
                attend_head(st, b, hh, s.qkv + (size_t)b * C3, s.sc, y_att + (size_t)b * C + hh * hd, kl, vl);
        pool_barrier(st->pool);
        s.in.x = y_att;
        mat_in(fmt, B, C, &s.in);
        matmul(fmt, B, C, c0, c1, C, &s.in, mat(lw, 1), lw->b_o, h_att);
        pool_barrier(st->pool);
        for (int b = 0; b < B; b++) {
            edit_update(d, &a->edits, b, l, 0, a->pos[b], s.x + (size_t)b * C, h_att + (size_t)b * C);
            layer_norm(C, s.x + (size_t)b * C, lw->ln_2_w, lw->ln_2_b, s.h + (size_t)b * C);
        }
        s.in.x = s.h;
        mat_in(fmt, B, C, &s.in);
        matmul(fmt, B, C, f0, f1, F, &s.in, mat(lw, 2), lw->b_fc, ff);
        for (int b = 0; b < B; b++) gelu_tanh(f1 - f0, ff + (size_t)b * F + f0);
        pool_barrier(st->pool);
        s.in.x = ff;
        mat_in(fmt, B, F, &s.in);
        matmul(fmt, B, F, c0, c1, C, &s.in, mat(lw, 3), lw->b_p, y_mlp);
        pool_barrier(st->pool);
        for (int b = 0; b < B; b++)
            edit_update(d, &a->edits, b, l, 1, a->pos[b], s.x + (size_t)b * C, y_mlp + (size_t)b * C);
        if (t == 0) trace_rows(st, 0, B, l + 1, s.x);
    }
    for (int b = 0; b < B; b++) layer_norm(C, s.x + (size_t)b * C, w->ln_f_w, w->ln_f_b, s.h + (size_t)b * C);
    if (v1 > v0) mm_f32(B, C, v1 - v0, V, s.h, w->unembed_t + v0, s.zero + v0, a->logits + v0);
}

/* One step (fused_step.h). The cache: (L, rows, nh, S, hd) with the given layer and row strides (elements); a row
 * stride of 0 makes every row share one cache row: rows go in order, each writing its key and value right before it
 * attends, so rows at positions 0..B-1 are a causal prefill of one sequence. A float16 cache (kv_half) halves the
 * bytes attention reads, the keys and values rounded once when written.
 *
 * Threads (args->pool): rows are split across them when there are several rows with their own cache rows (each
 * thread runs the whole step for its rows; no barrier), columns and heads otherwise (one row, or a prefill). Either
 * way every output is the same sum in the same order as with one thread: the numbers do not depend on the threads. */
int shortcut_fused_step(const ShortcutDims *d, const ShortcutWeights *w, const ShortcutStepArgs *a) {
    const int B = a->B, V = d->vocab_size, S = d->block_size, R = a->R;
    for (int b = 0; b < B; b++) {
        if (a->tokens[b] < 0 || a->tokens[b] >= V) return SHORTCUT_EBAD_TOKEN;
        if (a->pos[b] < 0 || a->pos[b] >= S) return SHORTCUT_EBAD_POS;
    }
    for (int r = 0; r < R; r++)
        if (a->trace_rows[r] < 0 || a->trace_rows[r] >= B) return SHORTCUT_EBAD_TRACE;
    if (d->weights == SHORTCUT_WEIGHTS_INT8 && d->int8_layout != SHORTCUT_INT8_PAIRS &&
        d->int8_layout != shortcut_fused_int8_layout())
        return SHORTCUT_EBAD_LAYOUT;
    if (B == 0) return SHORTCUT_OK;
    Pool *pool = a->pool != NULL && a->pool->n > 1 ? a->pool : NULL;
    const int T = pool ? pool->n : 1;
    const int by_rows = T == 1 || (B >= 2 && a->row_stride != 0);
    Step st = {d, w, a, pool, NULL, 0, NULL};
    const int rows_each = by_rows ? (B + T - 1) / T : B;
    st.per_thread = (scratch_bytes(d, rows_each) + 63) & ~(size_t)63;
    size_t shared = by_rows ? 0 : sizeof(float) * (size_t)B * (3 * d->d_model + d->d_ff);
    char *buf = (char *)aligned_alloc(64, st.per_thread * T + ((shared + 63) & ~(size_t)63));
    if (buf == NULL) return SHORTCUT_ENOMEM;
    st.scratch = buf;
    st.shared = (float *)(buf + st.per_thread * T);
    if (pool == NULL)
        step_rows(&st, 0, B, buf);
    else
        pool_run(pool, by_rows ? rows_job : cols_job, &st);
    free(buf);
    return SHORTCUT_OK;
}
