/* The C boundary of the fused decode step (fused_step.c): what one call takes, as structs, not a list.
 *
 * Mirrored field for field by ctypes.Structure classes in model/fast/abi.py (tests/model/test_fused_abi.py compares
 * every offset and size with the library's own `shortcut_fused_layout` table). The loader refuses a library whose
 * `shortcut_fused_abi_version()` is not abi.ABI_VERSION (the TorchScript step runs instead): bump
 * SHORTCUT_FUSED_ABI_VERSION here and there whenever a struct, a field's meaning or a prototype changes.
 *
 * Names: C d_model, nh n_head, L n_layer, F d_ff, V vocab_size, S block_size (the cache's length), hd = C / nh,
 * B the rows of one step. Block matrices follow ShortcutDims.weights: float32 or float16 (in, out) row-major, or int8
 * with a float32 scale per output (the s_* fields: w = int8 * s), packed as ShortcutDims.int8_layout says: pairs
 * (in / 2, out, 2), the weights of inputs 2i, 2i + 1 side by side per output (the AVX2 kernel, vpmaddwd), or quads
 * (in / 4, out, 4), inputs 4i..4i + 3 side by side (the VNNI kernel, vpdpbusd), with 128 times each output's column
 * sum as int32 (the z_* fields: the correction of the +128 offset that makes the activations unsigned).
 *
 * To add a kind of stream edit (say, a vector added to the stream at some positions), touch exactly:
 *   1. model/edits.py: a field on StreamEdits (and Intervention), its effect in `apply` (the torch paths);
 *   2. this header: its pointer(s) in ShortcutEdits, and bump SHORTCUT_FUSED_ABI_VERSION;
 *   3. fused_step.c: its effect in `edit_update` (which gets the row, layer, part and the row's position);
 *   4. model/fast/abi.py: the same field in the ShortcutEdits mirror, filled in `edits_struct`, and ABI_VERSION.
 */
#ifndef SHORTCUT_FUSED_STEP_H
#define SHORTCUT_FUSED_STEP_H

#include <stdint.h>

#ifndef SHORTCUT_FUSED_ABI_VERSION /* overridable only so that a test can build a deliberately stale library */
#define SHORTCUT_FUSED_ABI_VERSION 5
#endif

/* ShortcutDims.weights: float32; float16 (arithmetic in float32); int8 with a scale per output, each row of a matrix's
 * input quantized alone per step (scale max|x| / 127), sums in int32 */
enum { SHORTCUT_WEIGHTS_F32 = 0, SHORTCUT_WEIGHTS_F16 = 1, SHORTCUT_WEIGHTS_INT8 = 2 };

/* ShortcutDims.int8_layout: how int8 matrices are packed, and so which kernel runs them. Pairs run everywhere; quads
 * only where shortcut_fused_int8_layout() says so (a CPU with AVX512_VNNI and AVX512VL under the AVX-512 build) */
enum { SHORTCUT_INT8_PAIRS = 0, SHORTCUT_INT8_QUADS = 1 };

/* The model's shape and the step's number formats; fixed for a decoder. */
typedef struct {
    int32_t d_model;    /* C */
    int32_t n_head;     /* nh; hd = C / nh, a multiple of 8, at most 256 */
    int32_t n_layer;    /* L */
    int32_t d_ff;       /* F */
    int32_t vocab_size; /* V */
    int32_t block_size; /* S: positions 0..S-1 */
    int32_t weights;    /* SHORTCUT_WEIGHTS_*: the block matrices' format */
    int32_t residual;   /* 1: x + F(x) (a residual stack); 0: F(x) replaces x (a plain stack) */
    int32_t int8_layout; /* SHORTCUT_INT8_*: how int8 matrices are packed (ignored for float weights) */
} ShortcutDims;

/* One block's parameters. Vectors are float32; a block without biases or LayerNorm affine gets zeros / ones. */
typedef struct {
    const void *w_qkv;   /* (C, 3C): q, k, v side by side */
    const void *w_o;     /* (C, C): attention output projection */
    const void *w_fc;    /* (C, F): MLP up */
    const void *w_p;     /* (F, C): MLP down */
    const float *ln_1_w; /* (C) */
    const float *ln_1_b; /* (C) */
    const float *b_qkv;  /* (3C) */
    const float *b_o;    /* (C) */
    const float *ln_2_w; /* (C) */
    const float *ln_2_b; /* (C) */
    const float *b_fc;   /* (F) */
    const float *b_p;    /* (C) */
    const float *s_qkv;  /* (3C) int8 weights' scales per output; NULL otherwise */
    const float *s_o;    /* (C) */
    const float *s_fc;   /* (F) */
    const float *s_p;    /* (C) */
    const int32_t *z_qkv; /* (3C) int8 quads: 128 * sum over inputs of each output's int8 weights; NULL otherwise */
    const int32_t *z_o;   /* (C) */
    const int32_t *z_fc;  /* (F) */
    const int32_t *z_p;   /* (C) */
} ShortcutLayerWeights;

/* Every parameter of the model; fixed for a decoder. */
typedef struct {
    const float *wte;                   /* (V, C) token embedding */
    const float *wpe;                   /* (S, C) position embedding */
    const float *unembed_t;             /* (C, V) the tied unembedding, transposed */
    const float *ln_f_w;                /* (C) final LayerNorm */
    const float *ln_f_b;                /* (C) */
    const ShortcutLayerWeights *layers; /* (L) */
} ShortcutWeights;

/* A step's changes to the residual stream, per row (model/edits.py's StreamEdits); applied by `edit_update` where
 * each part's update meets the stream. A NULL field changes nothing. */
typedef struct {
    const float *gates;      /* (B, L, 2) or NULL: the factor on each layer's attention (0) and MLP (1) update */
    const float *add;        /* (B, L, 2, C) or NULL: added to the stream after block l (its resid_post), at the row's
                              * prompt positions ([b, l, 0]) or its generated ones ([b, l, 1]) */
    const int64_t *n_prompt; /* (B), with add: position p of row b is generated when p >= n_prompt[b] */
} ShortcutEdits;

/* A pool of threads for steps (shortcut_fused_pool_new), opaque; one step at a time uses it */
typedef struct ShortcutPool ShortcutPool;

/* One step: a token per row at its position, each row's keys and values read from and written to its cache row. */
typedef struct {
    int32_t B;                 /* rows */
    int32_t kv_half;           /* 1: the cache is float16 (rounded once when written); 0: float32 */
    const int64_t *tokens;     /* (B) in [0, V) */
    const int64_t *pos;        /* (B) in [0, S) */
    void *k_cache;             /* (L, rows, nh, S, hd), rows and heads contiguous, with the strides below */
    void *v_cache;             /* same shape and strides as k_cache */
    int64_t layer_stride;      /* elements between layers of the cache */
    int64_t row_stride;        /* elements between rows; 0: every row shares one cache row (a prefill, see .c) */
    ShortcutEdits edits;       /* per-row stream edits */
    const int64_t *trace_rows; /* (R) rows in [0, B) whose stream is returned, or NULL with R = 0 */
    int32_t R;
    float *stream;             /* out: (L + 1, R, C), the traced rows' stream before block 0 and after each block */
    float *logits;             /* out: (B, V) */
    ShortcutPool *pool;        /* threads to run the step on, or NULL: the caller's thread alone */
} ShortcutStepArgs;

/* Error codes of shortcut_fused_step (0: done). Input is checked before anything is read or written. */
enum {
    SHORTCUT_OK = 0,
    SHORTCUT_ENOMEM = -1,     /* scratch memory could not be allocated */
    SHORTCUT_EBAD_TOKEN = -2, /* a token id outside [0, V) */
    SHORTCUT_EBAD_POS = -3,   /* a position outside [0, S) */
    SHORTCUT_EBAD_TRACE = -4, /* a traced row outside [0, B) */
    SHORTCUT_EBAD_LAYOUT = -5, /* int8 weights in a layout this library cannot run on this CPU */
};

/* SHORTCUT_FUSED_ABI_VERSION as built: the loader's first question. */
int shortcut_fused_abi_version(void);
/* "avx2" or "avx512": which build this is, asked before any kernel runs. */
const char *shortcut_fused_isa(void);
/* The int8 layout (SHORTCUT_INT8_*) of the fastest int8 kernel this library runs on this CPU: quads where it was
 * built with the VNNI kernel (the AVX-512 build) and the CPU has AVX512_VNNI and AVX512VL, else pairs (the test-only
 * build with vpdpbusd emulated, -DSHORTCUT_EMULATE_VNNI: quads on any AVX2 CPU). */
int shortcut_fused_int8_layout(void);
/* For tests: out[i] = acc[i] + sum_j a[4i + j] * b[4i + j] for i < n (n % 8 == 0; u8 a, s8 b, int32 wrapping, no
 * saturation) through the VNNI kernel's own vpdpbusd (the instruction, or the test build's emulation); returns 0, or
 * -1 (nothing written) where this library or CPU has no VNNI kernel. */
int shortcut_fused_dpbusd(int n, const int32_t *acc, const uint8_t *a, const int8_t *b, int32_t *out);
/* The `i`th entry of the struct layout table ("Struct" with its size, or "Struct.field" with its offset and size);
 * NULL past the end. For the test that holds the ctypes mirrors to this header. */
const char *shortcut_fused_layout(int i, int64_t *offset, int64_t *size);
/* A pool of `threads` threads, the caller of a step counted (threads - 1 workers, started now, asleep between steps);
 * NULL for threads < 2 or when they cannot be started. */
ShortcutPool *shortcut_fused_pool_new(int threads);
/* The threads of a pool, the caller's included (1 for NULL) */
int shortcut_fused_pool_threads(const ShortcutPool *pool);
/* Stops and joins the pool's workers; NULL is fine. Not while a step runs on it. */
void shortcut_fused_pool_free(ShortcutPool *pool);
/* One decode step; returns SHORTCUT_OK or an error code above. */
int shortcut_fused_step(const ShortcutDims *dims, const ShortcutWeights *weights, const ShortcutStepArgs *args);

#endif
