/* Decode steps and prompt layers of a Llama-style model on the CPU (parley/engine/fast.py calls
 * them via ctypes), with the variations of the other families (Layer and Shape: biases, q/k
 * norms, Gemma 3's norms and GeGLU, sliding windows, soft-capping, mixtures of experts).
 *
 * Decoding one token at a time is bound by memory bandwidth: every weight is read once
 * per step and used for only a few multiply-adds. Stock PyTorch reaches a fraction of the
 * bandwidth there (bf16 matrix-vector products especially) and pays microseconds of
 * dispatch for each of the ~1,000 small ops of a 30-layer step. Here the whole step is one
 * call and one OpenMP parallel region: weights are read as bf16 (or fp32) straight into
 * fp32 registers, activations stay fp32, and the threads meet at a barrier between ops.
 * Functions named *_for are work-shared loops: they must run inside the parallel region.
 *
 * With bf16 weights on a CPU with AMX (and shapes in whole tiles), the projections run on
 * the tile unit instead: activations are rounded to bf16 and multiplied with fp32
 * accumulation, 16 weight rows x 16 batch rows x 32 inputs per instruction. A block of
 * weights is read from memory once for all the batch rows, so 32 rows cost ~1.5x one row,
 * not 32x. Every row's sums run in the
 * same order whatever the batch size, so a request's logits do not depend on what it is
 * batched with: the same greedy output alone or among 64.
 *
 * Layouts (all row-major, contiguous unless a stride is given):
 *   x, y        [B, n] activations, fp32
 *   W           [O, I] weights (nn.Linear layout), bf16 bits (uint16) or fp32
 *   K, V        [pages, n_kv, page_size, hd] page pools of the paged cache (engine/cache.py),
 *               fp32 (or bf16 on the tile path)
 *   table       [B, width] int64: row b's position p lives in page table[b, p / page_size]
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif


static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#ifdef __AVX512F__
static inline __m512 load16(const void *W, int w_bf16, long at) {
    if (!w_bf16) return _mm512_loadu_ps((const float *)W + at);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)W + at));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); /* bf16 -> fp32 is a shift */
}

/* r[i] (i < 16) as rows of a 16 x 16 matrix of 32-bit words, transposed into out. Two rounds of
 * unpacking transpose the 4 x 4 blocks inside each 128-bit lane; two rounds of lane shuffles
 * then move the blocks. */
static inline void transpose16(const __m512i r[16], __m512i out[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* u[4g + m], lane l: column 4l + m of rows 4g..4g+3 */
    for (int g = 0; g < 4; g++) {
        const __m512i *q = t + 4 * g;
        u[4 * g + 0] = _mm512_unpacklo_epi64(q[0], q[2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(q[0], q[2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(q[1], q[3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(q[1], q[3]);
    }
    for (int m = 0; m < 4; m++) { /* out[4l + m] = lane l of u[m], u[4 + m], u[8 + m], u[12 + m] */
        __m512i x0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x44), x1 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xee);
        __m512i x2 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x44), x3 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xee);
        out[m] = _mm512_shuffle_i32x4(x0, x2, 0x88);
        out[4 + m] = _mm512_shuffle_i32x4(x0, x2, 0xdd);
        out[8 + m] = _mm512_shuffle_i32x4(x1, x3, 0x88);
        out[12 + m] = _mm512_shuffle_i32x4(x1, x3, 0xdd);
    }
}

/* e^x on 16 lanes: 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two parts, so
 * r is exact), e^r by its Taylor series to r^7 (|r| <= 0.35: relative error below 1e-7).
 * Inputs are clamped to [-104, 88.7]: -inf gives 0 (e^-104 rounds to it), +inf a finite 3e38. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 e = _mm512_set1_ps(1.f / 5040);
    static const float taylor[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
    for (int t = 0; t < 7; t++) e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(taylor[t]));
    return _mm512_scalef_ps(e, n);
}

/* silu(g) * u = g / (1 + e^-g) * u on 16 lanes: the MLP's activation, one formula for the plain
 * and the fused (amx_gate_up_for) paths, so both give the same bits. */
static inline __m512 silu_mul16(__m512 g, __m512 u) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), u);
}

/* gelu_tanh(g) * u (Gemma's GeGLU): 0.5 g (1 + tanh z) with z = sqrt(2/pi) (g + 0.044715 g^3) is
 * g sigmoid(2z) = g / (1 + e^-2z), with the same e^x as silu. */
static inline __m512 gelu_mul16(__m512 g, __m512 u) {
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
    const __m512 z2 = _mm512_mul_ps(_mm512_set1_ps(-1.5957691216f), _mm512_fmadd_ps(cube, _mm512_set1_ps(0.044715f), g));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(z2))), u);
}

static inline __m512 act_mul16(__m512 g, __m512 u, int gelu) { return gelu ? gelu_mul16(g, u) : silu_mul16(g, u); }
#endif

/* act_mul16 for one value */
static inline float act_mul1(float g, float u, int gelu) {
    const float e = gelu ? expf(-1.5957691216f * (g + 0.044715f * g * g * g)) : expf(-g);
    return g / (1.f + e) * u;
}

static inline float load1(const void *W, int w_bf16, long at) {
    return w_bf16 ? bf16_to_f32(((const uint16_t *)W)[at]) : ((const float *)W)[at];
}

/* y[b, o] (+)= sum_i W[o, i] * x[b, i] for NR weight rows from o and NB batch rows of x.
 * NR * NB independent accumulators keep several FMA chains in flight; each weight vector is
 * loaded once and used NB times. Inlined with constant NR, NB so the block lives in registers. */
static inline __attribute__((always_inline)) void dot_block(const void *W, const int w_bf16, long I, long o,
                                                            const float *x, float *y, long y_stride,
                                                            int accumulate, const int NR, const int NB) {
    float sums[4][4];
    long i = 0;
#ifdef __AVX512F__
    __m512 acc[4][4];
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    for (; i + 16 <= I; i += 16) {
        __m512 w[4];
        /* ask for the rows 8 ahead now: the hardware prefetcher alone leaves DRAM ~30% idle here */
        for (int r = 0; r < NR; r++)
            _mm_prefetch((const char *)W + ((o + r + 8) * I + i) * (w_bf16 ? 2 : 4), _MM_HINT_T0);
        for (int r = 0; r < NR; r++) w[r] = load16(W, w_bf16, (o + r) * I + i);
        for (int b = 0; b < NB; b++) {
            __m512 xv = _mm512_loadu_ps(x + b * I + i);
            for (int r = 0; r < NR; r++) acc[r][b] = _mm512_fmadd_ps(w[r], xv, acc[r][b]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) sums[r][b] = _mm512_reduce_add_ps(acc[r][b]);
#else
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) sums[r][b] = 0.f;
#endif
    for (; i < I; i++)
        for (int r = 0; r < NR; r++) {
            float w = load1(W, w_bf16, (o + r) * I + i);
            for (int b = 0; b < NB; b++) sums[r][b] += w * x[b * I + i];
        }
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) {
            float *out = y + b * y_stride + o + r;
            *out = (accumulate ? *out : 0.f) + sums[r][b];
        }
}

#define DOT_BLOCKS(NR, o)                                                                     \
    switch (nb) {                                                                            \
    case 4: dot_block(W, w_bf16, I, o, xb, yb, y_stride, accumulate, NR, 4); break;          \
    case 3: dot_block(W, w_bf16, I, o, xb, yb, y_stride, accumulate, NR, 3); break;          \
    case 2: dot_block(W, w_bf16, I, o, xb, yb, y_stride, accumulate, NR, 2); break;          \
    default: dot_block(W, w_bf16, I, o, xb, yb, y_stride, accumulate, NR, 1);                \
    }

/* How many rows of x (I values of `size` bytes) a product takes at a time: as many as fit in
 * 512 KB, so that they stay in L2 while every block of weight rows passes over them (a prompt
 * chunk's rows all at once would be read from memory again for each block), a multiple of 4. */
static inline int rows_in_l2(long I, int size) {
    const long rows = (512L << 10) / (I * size) / 4 * 4;
    return rows < 4 ? 4 : rows > (1 << 20) ? (1 << 20) : (int)rows;
}

/* The loop of a register-blocked product y (+)= x W^T (O outputs, B rows of x, I inputs of x_size
 * bytes): work-shared blocks of 4 weight rows from o, each against the rows of x 4 at a time (nb
 * rows from b0: xb, yb), those rows taken as many as fit in L2 at a time; BLOCKS(NR, o) runs one
 * block of NR weight rows. */
#define FOR_BLOCKS(x_size, BLOCKS)                                                                \
    const int chunk = rows_in_l2(I, x_size);                                                     \
    for (int c0 = 0; c0 < B; c0 += chunk) {                                                      \
        const int c1 = B - c0 < chunk ? B : c0 + chunk;                                          \
        _Pragma("omp for schedule(static)")                                                      \
        for (long o = 0; o < O; o += 4)                                                          \
            for (int b0 = c0; b0 < c1; b0 += 4) {                                                \
                const int nb = c1 - b0 < 4 ? c1 - b0 : 4;                                        \
                const __typeof__(x) xb = x + b0 * I;                                             \
                float *yb = y + b0 * y_stride;                                                   \
                if (o + 4 <= O) {                                                                \
                    BLOCKS(4, o)                                                                 \
                } else {                                                                         \
                    for (long tail = o; tail < O; tail++) BLOCKS(1, tail)                        \
                }                                                                                \
            }                                                                                    \
    }

static inline __attribute__((always_inline)) void linear_impl(const void *W, const int w_bf16, const float *x,
                                                              float *y, long y_stride, int B, long I, long O,
                                                              int accumulate) {
    FOR_BLOCKS(4, DOT_BLOCKS)
}

/* y[b, o] (+)= sum_i W[o, i] * x[b, i] with AVX-512 FMAs (where the build has them; linear_for
 * picks the path). W is bf16 bits when w_bf16, else fp32; rows of y are y_stride apart, so q, k
 * and v (or gate and up) can be written side by side into one buffer. Weight rows are read from
 * memory once, in blocks of 4, and applied to every row of x while they sit in L1. */
static void linear_avx512_for(const void *W, int w_bf16, const float *x, float *y, long y_stride, int B, long I,
                              long O, int accumulate) {
    if (w_bf16)
        linear_impl(W, 1, x, y, y_stride, B, I, O, accumulate);
    else
        linear_impl(W, 0, x, y, y_stride, B, I, O, accumulate);
}

/* One LoRA adapter's matrices in one layer (engine/adapters.py), fp32 or bf16 (bf16: a model in
 * bf16, half the bytes each step reads), for the targets q, k, v, o, gate, up, down in that order
 * (NULL where the adapter leaves one alone): A [r, in] and B transposed, Bt [r, out]. A row with
 * this adapter gets y += scale * (x A^T) B^T after its projection. */
#define LORA_MAX_RANK 64
#define LORA_UNIT 16
enum { T_Q, T_K, T_V, T_O, T_GATE, T_UP, T_DOWN };
typedef struct {
    const void *A[7], *Bt[7];
    long r;
    float scale;
    long bf16;
    const void *B[7]; /* bf16 models: B [out, r] as trained, 32 zeros after it, for the tile path (lora_up_tiles) */
} Lora;

/* The adapters of a product on the tile unit (lora_down_tiles_for, lora_up_tiles): the call's
 * segments (Buffers' lora_blocks, lora_segs, lora_u), the layer, and the target of each of the
 * product's `count` matrices (slot m of a segment's u holds matrix m's). */
#define LORA_U_TILES (LORA_MAX_RANK / 32)
typedef struct {
    const int64_t *blocks, *segs;
    uint32_t *u;
    long layer;
    int count, t[3];
} Adapted;

#ifdef HAVE_AMX
/* Ask Linux for the AMX tile state (once per process; a no-op when granted already).
 * Returns 1 when the tile unit can be used. */
int amx_enable(void) {
    const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* Every tile is 16 rows x 64 bytes: weights 16 x 32 bf16, packed activations 16 pairs x 16
 * rows, sums 16 x 16 fp32. Tile config is per thread: each thread of the region loads it. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) TileConfig;

/* GCC's _tile_loadconfig tells the compiler it reads 8 bytes of the config: where tiles_on is
 * inlined (into lora_down_tiles_for) the other 56 were not stored first. Letting the config's
 * address escape makes every store happen. */
#define TILES_ESCAPE(tc) __asm__ volatile("" : : "r"(&(tc)) : "memory")

static void tiles_on(void) {
    TileConfig tc;
    memset(&tc, 0, sizeof tc);
    tc.palette = 1;
    for (int t = 0; t < 8; t++) tc.colsb[t] = 64, tc.rows[t] = 16;
    TILES_ESCAPE(tc);
    _tile_loadconfig(&tc);
}

/* ------------------------------------------------------------ adapters on the tile unit
 *
 * A row's adapter term scale * B (A x) in two products on tiles, grouped as Punica's SGMV groups
 * them: the rows of each block of 16 (the tile unit's batch columns) that share an adapter are one
 * segment. Down: u = A x for each segment, A [r, in] the left operand (r tile rows), the packed
 * input of the projection the right; scaled, rounded to bf16, and packed as pair tiles with zeros
 * for the block's other rows (lora_down_tiles_for). Up: before a projection stores its sums, each
 * segment of the block adds B u on the same tiles (LORA_UP): B [out, r] is read as it is stored,
 * 32 columns a tile row at a stride of r, so a row reads past its own r values into the next rows';
 * those meet zero pairs of u and add exact zeros (B is finite: adapters.py checks). Per row, the
 * sums are its projection's, then its own adapter's products, then zeros: the same bits whatever
 * the block holds, so a row still gets the bits it gets alone; and there is no fp32 pass over y. */

/* Tiles for an adapter of rank r: tiles 1 (sums) and 5 (rows of A) hold the last (r - 1) % 16 + 1
 * ranks, the rest as tiles_on sets them. */
static void lora_tiles_on(int r) {
    TileConfig tc;
    memset(&tc, 0, sizeof tc);
    tc.palette = 1;
    for (int t = 0; t < 8; t++) tc.colsb[t] = 64, tc.rows[t] = 16;
    tc.rows[1] = tc.rows[5] = (uint8_t)((r - 1) % 16 + 1);
    TILES_ESCAPE(tc);
    _tile_loadconfig(&tc);
}

/* sums[k0 .. k0 + rows of tile C) = A[k0 ..] x for the 16 rows of x packed at x (pack_for's layout,
 * Bp rows a block of inputs), on tiles C and TW. */
#define LORA_DOWN(C, TW)                                                                       \
    {                                                                                          \
        _tile_zero(C);                                                                         \
        for (long i = 0; i < I; i += 32) {                                                     \
            _tile_loadd(TW, A + k0 * I + i, I * 2);                                            \
            _tile_loadd(6, x + (i / 32) * Bp * 16, 64);                                        \
            _tile_dpbf16ps(C, TW, 6);                                                          \
        }                                                                                      \
        _tile_stored(C, sums[k0], 64);                                                         \
    }

/* u of every segment of the call, for the targets ad->t[0 .. count) of the input packed in xp (Bp
 * rows, I inputs): u[p] of a segment is the word pair (bf16 scale (A x)[2p], bf16 scale (A x)[2p + 1])
 * of each of its block's 16 rows, zero for rows not in the segment and for ranks from r on, as
 * LORA_U_TILES tiles. Leaves this thread's tiles as tiles_on sets them. */
static void lora_down_tiles_for(const Adapted *ad, const uint32_t *xp, int Bp, long I) {
    const long segments = ad->blocks[Bp / 16];
    int config = 0; /* the rank this thread's tiles are set for; 0: tiles_on's setting */
#pragma omp for schedule(static)
    for (long j = 0; j < segments * ad->count; j++) {
        const long s = j / ad->count;
        const int m = (int)(j % ad->count);
        const Lora *a = (const Lora *)(intptr_t)ad->segs[3 * s] + ad->layer;
        const uint16_t *A = a->A[ad->t[m]];
        if (!A || !a->B[ad->t[m]]) continue;
        const int r = (int)a->r;
        const uint32_t *x = xp + ad->segs[3 * s + 1] * 16 * 16;
        if (config != r) lora_tiles_on(r), config = r;
        float sums[LORA_MAX_RANK][16];
        for (int k0 = 0; k0 < r; k0 += 16) {
            if (k0 + 16 < r)
                LORA_DOWN(0, 4)
            else
                LORA_DOWN(1, 5)
        }
        const __mmask16 rows = (__mmask16)ad->segs[3 * s + 2];
        const __m512 scale = _mm512_set1_ps(a->scale);
        uint32_t *u = ad->u + (s * 3 + m) * LORA_U_TILES * 256;
        for (int p = 0; p < (r + 31) / 32 * 16; p++) {
            __m512i half[2];
            for (int e = 0; e < 2; e++) {
                const __m512 v = 2 * p + e < r ? _mm512_maskz_mul_ps(rows, _mm512_loadu_ps(sums[2 * p + e]), scale)
                                               : _mm512_setzero_ps();
                half[e] = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v));
            }
            _mm512_storeu_si512(u + p * 16, _mm512_or_si512(half[0], _mm512_slli_epi32(half[1], 16)));
        }
    }
    if (config) tiles_on();
}

/* Adds B u of matrix `slot`'s adapters, its rows o_rows .. + 16, for the segments of row block nb
 * to the sums on tile C (TW: a free tile for rows of B). */
#define LORA_UP(C, TW, slot, o_rows, nb)                                                       \
    for (long s = ad->blocks[nb]; s < ad->blocks[(nb) + 1]; s++) {                             \
        const Lora *a = (const Lora *)(intptr_t)ad->segs[3 * s] + ad->layer;                   \
        const uint16_t *Bw = (const uint16_t *)a->B[ad->t[slot]];                              \
        const uint32_t *u = ad->u + (s * 3 + (slot)) * LORA_U_TILES * 256;                     \
        for (long k = 0; Bw && k < a->r; k += 32, u += 256) {                                  \
            _tile_loadd(6, u, 64);                                                             \
            _tile_loadd(TW, Bw + (o_rows) * a->r + k, a->r * 2);                               \
            _tile_dpbf16ps(C, TW, 6);                                                          \
        }                                                                                      \
    }

/* Packs x [B, I] fp32 for the tile unit: pair p of row b is (bf16(x[b, 2p]), bf16(x[b, 2p + 1]))
 * as one 32-bit word, and each tile (16 pairs x 16 rows, rows from B on zero) is stored as
 * one contiguous 1 KB block: xp[kb, nb] for input block kb (32 inputs) and row block nb, so a
 * tile load reads 1 KB in a row. I % 32 == 0; Bp is B rounded up to 16. */
static void pack_for(const float *x, uint32_t *xp, int B, int Bp, long I) {
#pragma omp for collapse(2) schedule(static)
    for (long kb = 0; kb < I / 32; kb++)
        for (int nb = 0; nb < Bp / 16; nb++) {
            __m512i rows[16], pairs[16];
            for (int i = 0; i < 16; i++) {
                const long b = nb * 16 + i;
                const float *src = x + b * I + kb * 32;
                rows[i] = b < B ? (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src))
                                : _mm512_setzero_si512();
            }
            transpose16(rows, pairs); /* row i of the tile: pair i of the 16 batch rows */
            uint32_t *tile = xp + (kb * Bp + nb * 16) * 16;
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(tile + i * 16, pairs[i]);
        }
}

/* y[b, o] (+)= sum_i W[o, i] * x[b, i] on the tile unit, with x packed by pack_for (Bp rows, a
 * multiple of 16), for W the `count` matrices Ws stacked along their outputs (rows[m] each: q | k | v
 * or gate | up, written side by side into y), so that they share one work-shared loop. Each W
 * is [rows, I] bf16 in nn.Linear layout, used as is: a 16-row block of it is a tile of the
 * left operand, so the product is y transposed, 16 outputs x 16 batch rows a tile.
 * I % 32 == 0, rows[m] % 16 == 0. */
static void amx_linear_for(const uint16_t *const *Ws, const long *rows, int count, const uint32_t *xp, int Bp, float *y,
                           long y_stride, int B, long I, int accumulate, const Adapted *ad) {
    const long w_stride = I * 2;
    long blocks = 0;
    for (int m = 0; m < count; m++) blocks += (rows[m] + 31) / 32;
#pragma omp for schedule(static)
    for (long j = 0; j < blocks; j++) {
        int m = 0;
        long o = j * 32, column0 = 0; /* block j: rows o.. of matrix m, outputs column0 + o.. */
        while (o >= (rows[m] + 31) / 32 * 32) o -= (rows[m] + 31) / 32 * 32, column0 += rows[m], m++;
        const uint16_t *W = Ws[m];
        const int two = o + 32 <= rows[m]; /* a last block of 16 rows uses one weight tile */
        /* the next block's rows (contiguous in memory, in this matrix or the next), fetched into
         * L2 a slice per k step during the first pass over this block: with 32 or more rows the
         * tile unit otherwise waits on DRAM (a 32-row decode step went from 26.2 to 22.8 ms); with
         * one row tile of 16 the hardware prefetcher alone is as fast, and the extra instructions cost */
        const char *next = NULL;
        if (j + 1 < blocks)
            next = o + 32 < rows[m] ? (const char *)(W + (o + 32) * I) : m + 1 < count ? (const char *)Ws[m + 1] : NULL;
        for (int b0 = 0; b0 < Bp; b0 += 32) {
            const int wide = b0 + 32 <= Bp;
            float sums[4][16][16];
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (long k = 0; k < I; k += 32) {
                const uint32_t *xk = xp + ((k / 32) * Bp + b0) * 16;
                if (next && b0 == 0 && Bp >= 32) /* 32 rows x 64 bytes of the next block each k step */
                    for (int line = 0; line < 32; line++) _mm_prefetch(next + k * 64 + line * 64, _MM_HINT_T1);
                _tile_loadd(4, W + o * I + k, w_stride);
                _tile_loadd(6, xk, 64);
                _tile_dpbf16ps(0, 4, 6);
                if (wide) {
                    _tile_loadd(7, xk + 256, 64);
                    _tile_dpbf16ps(1, 4, 7);
                }
                if (two) {
                    _tile_loadd(5, W + (o + 16) * I + k, w_stride);
                    _tile_dpbf16ps(2, 5, 6);
                    if (wide) _tile_dpbf16ps(3, 5, 7);
                }
            }
            if (ad) { /* the adapters' B u of these rows, onto the same sums (lora_down_tiles_for made u) */
                LORA_UP(0, 4, m, o, b0 / 16)
                if (two) LORA_UP(2, 5, m, o + 16, b0 / 16)
                if (wide) {
                    LORA_UP(1, 4, m, o, b0 / 16 + 1)
                    if (two) LORA_UP(3, 5, m, o + 16, b0 / 16 + 1)
                }
            }
            _tile_stored(0, sums[0], 64);
            if (wide) _tile_stored(1, sums[1], 64);
            if (two) _tile_stored(2, sums[2], 64);
            if (two && wide) _tile_stored(3, sums[3], 64);
            const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2,
                                                                       1, 0), _mm512_set1_epi32(16));
            for (int t = 0; t < 4; t++) { /* tile t holds y[b0 + cols + n, o + lower + m] at [m][n] */
                int lower = t >= 2 ? 16 : 0, cols = t & 1 ? 16 : 0;
                if ((lower && !two) || (cols && !wide)) continue;
                const int n_rows = B - (b0 + cols) < 16 ? B - (b0 + cols) : 16;
                __m512i by_output[16], by_row[16];
                if (n_rows >= 8) { /* most of the tile is wanted: transpose it whole, else gather its columns */
                    for (int m = 0; m < 16; m++) by_output[m] = _mm512_loadu_si512(sums[t][m]);
                    transpose16(by_output, by_row);
                }
                for (int n = 0; n < n_rows; n++) {
                    float *out = y + (long)(b0 + cols + n) * y_stride + column0 + o + lower;
                    __m512 v = n_rows >= 8 ? _mm512_castsi512_ps(by_row[n]) : _mm512_i32gather_ps(column, &sums[t][0][n], 4);
                    _mm512_storeu_ps(out, accumulate ? _mm512_add_ps(_mm512_loadu_ps(out), v) : v);
                }
            }
        }
    }
}

/* The MLP's first half on the tile unit, fused: act = silu(x gate^T) * (x up^T) (gelu with `gelu`) for x packed by
 * pack_for, written straight in pack_for's layout (act_p) for the down projection to read, so
 * the [B, 2 inter] sums never go to memory and act is never packed (for a 390-row chunk the
 * unfused readback cost as much as a third of the products). Block j: the same 16 outputs of
 * gate and of up, 32 rows at a time. Element by element the arithmetic of amx_linear_for,
 * act_mul_for and pack_for: the same bits. I % 32 == 0, inter % 32 == 0. */
static void amx_gate_up_for(const uint16_t *gate, const uint16_t *up, const uint32_t *xp, int Bp, long I, long inter,
                            uint32_t *act_p, int gelu, const Adapted *ad) {
    const long w_stride = I * 2;
#pragma omp for schedule(static)
    for (long j = 0; j < inter / 16; j++) {
        const long o = j * 16;
        const int more = o + 16 < inter; /* the next block's rows: fetched into L2 as in amx_linear_for */
        const char *next_gate = (const char *)(gate + (o + 16) * I), *next_up = (const char *)(up + (o + 16) * I);
        for (int b0 = 0; b0 < Bp; b0 += 32) {
            const int wide = b0 + 32 <= Bp;
            float g[2][16][16], u[2][16][16];
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (long k = 0; k < I; k += 32) {
                const uint32_t *xk = xp + ((k / 32) * Bp + b0) * 16;
                if (more && b0 == 0 && Bp >= 32) /* 16 rows x 64 bytes of each next block per k step */
                    for (int line = 0; line < 16; line++) {
                        _mm_prefetch(next_gate + k * 32 + line * 64, _MM_HINT_T1);
                        _mm_prefetch(next_up + k * 32 + line * 64, _MM_HINT_T1);
                    }
                _tile_loadd(4, gate + o * I + k, w_stride);
                _tile_loadd(5, up + o * I + k, w_stride);
                _tile_loadd(6, xk, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(2, 5, 6);
                if (wide) {
                    _tile_loadd(7, xk + 256, 64);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            if (ad) { /* gate's adapters in slot 0, up's in slot 1 */
                LORA_UP(0, 4, 0, o, b0 / 16)
                LORA_UP(2, 5, 1, o, b0 / 16)
                if (wide) {
                    LORA_UP(1, 4, 0, o, b0 / 16 + 1)
                    LORA_UP(3, 5, 1, o, b0 / 16 + 1)
                }
            }
            _tile_stored(0, g[0], 64);
            _tile_stored(2, u[0], 64);
            if (wide) {
                _tile_stored(1, g[1], 64);
                _tile_stored(3, u[1], 64);
            }
            for (int half = 0; half <= wide; half++) { /* g[half][m][n]: output o + m of row b0 + 16 half + n */
                uint32_t *tile = act_p + ((o / 32) * Bp + b0 + half * 16) * 16 + (o % 32) / 2 * 16;
                for (int m = 0; m < 16; m += 2) {
                    __m512 h[2];
                    for (int e = 0; e < 2; e++)
                        h[e] = act_mul16(_mm512_loadu_ps(g[half][m + e]), _mm512_loadu_ps(u[half][m + e]), gelu);
                    /* pair m / 2 of the 16 rows: (bf16 act[o + m], bf16 act[o + m + 1]) in one word */
                    const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(h[0]));
                    const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(h[1]));
                    _mm512_storeu_si512(tile + m / 2 * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
                }
            }
        }
    }
}
#else
int amx_enable(void) { return 0; }
#endif

/* ---------------------------------------------------------------- quantized weights (model/quant.py)
 *
 * q8: int8 weights, a half-float scale d per block of 32 inputs (weight = d q); q4: two 4-bit
 * weights a byte (block k of a row is bytes 16k..16k+15, byte j holding input j in its low nibble
 * and input 16 + j in its high one), a scale d and a minimum m per block (weight = d q + m). The
 * input x of a projection is rounded to int8 first, per block of 32 (scale = max |x| / 127, as
 * llama.cpp's q8 activation blocks), so a block's product is one integer dot product of 32 pairs
 * times d * scale, plus, for q4, m * scale * sum(xq): a quarter (q8) or an eighth (q4) of the
 * bytes a bf16 weight takes, and 64 multiply-adds an instruction where the CPU has AVX512-VNNI.
 * Three paths, one build (per-function target attributes): VNNI (vpdpbusd), AVX2 (vpmaddubsw) and
 * portable C; quant_isa() says which this CPU can run. The VNNI and AVX2 paths read the weights
 * interleaved 16 rows at a time (fast.py copies them so at load: "the 16-row layout" below), 16
 * rows' sums a register and no sum across lanes, a block unpacked once for 8 (AVX2: 4) rows of x;
 * where a matrix's rows are not whole groups of 16 they read the file's layout row by row
 * (qdot_vnni, qdot_avx2: 2 blocks, or one, a register). Every path sums a block's integers exactly;
 * only the order of the float sums differs (tests/test_quant.py compares each with a float64
 * reference; the two 16-row paths give the same bits). Each row of x is rounded on its own, so a
 * row's result does not depend on its batch. */

typedef struct {
    const void *q;              /* int8 [O, I] (q8) or uint8 [O, I / 2] (q4) */
    const uint16_t *d, *m;      /* half floats [O, I / 32]; m only for q4 */
    int fmt;                    /* 8 or 4 */
    const uint8_t *rows16;      /* NULL, or the same weights in the 16-row layout (below) */
} QWeight;

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_VNNI = 2 };

static inline float half_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, mant = h & 1023;
    uint32_t u;
    if (exp == 31) u = sign | 0x7f800000 | (mant << 13); /* inf, nan */
    else if (exp) u = sign | ((exp + 112) << 23) | (mant << 13);
    else if (!mant) u = sign;
    else { /* subnormal: normalize */
        int e = -1;
        uint32_t m = mant;
        do { m <<= 1; e++; } while (!(m & 1024));
        u = sign | ((uint32_t)(112 - e) << 23) | ((m & 1023) << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The best path this CPU runs, at most `ceiling` (ISA_*): checked once by fast.py. */
int quant_isa(int ceiling) {
    int best = ISA_SCALAR;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = ISA_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni"))
        best = ISA_VNNI;
#endif
    return best < ceiling ? best : ceiling;
}

/* Block k of a row: its 32 values v rounded into xq (the row's int8) and xs (the row's 3 n floats). */
static inline void quantize_block(const float *v, int8_t *xq, float *xs, long n, long k) {
    float amax = 0.f;
    for (int i = 0; i < 32; i++) amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
    const float inverse = amax > 0.f ? 127.f / amax : 0.f, scale = amax / 127.f;
    int sum = 0;
    for (int i = 0; i < 32; i++) {
        const int q = (int)nearbyintf(v[i] * inverse);
        xq[k * 32 + i] = (int8_t)q;
        sum += q;
    }
    xs[k] = scale;
    xs[n + k] = scale * (float)sum;
    memcpy(xs + 2 * n + k, &sum, sizeof sum);
}

/* x [B, I] fp32 -> xq [B, I] int8 and xs [B, 3 I / 32]: per row, the blocks' scales, their
 * scale * sum(xq), then sum(xq) itself as int32 bits (the 16-row layout's q8 offset). Rounding half
 * to even (nearbyintf), as quant.quantize_activations does. */
static void quantize_rows_for(const float *x, int8_t *xq, float *xs, int B, long I) {
    const long n = I / 32;
#pragma omp for schedule(static)
    for (long j = 0; j < B * n; j++) {
        const long b = j / n;
        quantize_block(x + b * I + j % n * 32, xq + b * I, xs + b * 3 * n, n, j % n);
    }
}

/* The integer dot product of block k of weight row o with x's block k. */
static inline int block_dot(const QWeight *W, long o, long I, long k, const int8_t *x) {
    int s = 0;
    if (W->fmt == 8) {
        const int8_t *q = (const int8_t *)W->q + o * I + k * 32;
        for (int i = 0; i < 32; i++) s += q[i] * x[k * 32 + i];
    } else {
        const uint8_t *q = (const uint8_t *)W->q + o * I / 2 + k * 16;
        for (int i = 0; i < 16; i++) s += (q[i] & 15) * x[k * 32 + i] + (q[i] >> 4) * x[k * 32 + 16 + i];
    }
    return s;
}

/* The portable path: one weight row o against one row of x. */
static float qdot_scalar(const QWeight *W, long o, long I, const int8_t *x, const float *xs) {
    const long n = I / 32;
    const uint16_t *d = W->d + o * n;
    float total = 0.f;
    for (long k = 0; k < n; k++) total += (float)block_dot(W, o, I, k, x) * (half_to_f32(d[k]) * xs[k]);
    if (W->fmt == 4)
        for (long k = 0; k < n; k++) total += half_to_f32(W->m[o * n + k]) * xs[n + k];
    return total;
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

TARGET_AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* sum_k m[k] * sums[k] over n blocks: q4's minimums times the blocks' sums of x. */
TARGET_AVX2 static float min_terms_avx2(const uint16_t *m, const float *sums, long n) {
    __m256 acc = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= n; k += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + k))), _mm256_loadu_ps(sums + k), acc);
    float total = hsum8(acc);
    for (; k < n; k++) total += _cvtsh_ss(m[k]) * sums[k];
    return total;
}

/* AVX2: one block of 32 a register; vpmaddubsw multiplies unsigned by signed bytes, so q8 takes
 * |w| and x with w's sign (pairs of products stay below 2 * 128 * 127: no saturation). */
TARGET_AVX2 static float qdot_avx2(const QWeight *W, long o, long I, const int8_t *x, const float *xs) {
    const long n = I / 32;
    const uint16_t *d = W->d + o * n;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    if (W->fmt == 8) {
        const int8_t *q = (const int8_t *)W->q + o * I;
        for (long k = 0; k < n; k++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(q + k * 32));
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k * 32));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xv, w)), ones);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(_cvtsh_ss(d[k]) * xs[k]), acc);
        }
        return hsum8(acc);
    }
    const uint8_t *q = (const uint8_t *)W->q + o * I / 2;
    const __m256i low = _mm256_set1_epi8(15);
    for (long k = 0; k < n; k++) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)(q + k * 16));
        const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)(x + k * 32))),
                                            ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(_cvtsh_ss(d[k]) * xs[k]), acc);
    }
    return hsum8(acc) + min_terms_avx2(W->m + o * n, xs + n, n);
}

/* VNNI: two blocks a 512-bit register (lanes 0-7 the first block's sums, 8-15 the second's), the
 * weights unpacked once for NB rows of x (x rows I apart, xs rows 3 I / 32 apart). A q4 register
 * of nibbles [block k low | k+1 low | k high | k+1 high] is put in input order by one shuffle of
 * 128-bit lanes. q8's signed weights: vpdpbusd takes |w| and x with w's sign. */
TARGET_VNNI static inline __attribute__((always_inline)) void qdot_vnni_rows(const QWeight *W, long o, long I,
                                                                              const int8_t *x, const float *xs,
                                                                              float *out, const int NB) {
    const long n = I / 32;
    const uint16_t *d = W->d + o * n;
    __m512 acc[4];
    float tail[4] = {0.f, 0.f, 0.f, 0.f};
    for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    long k = 0;
    if (W->fmt == 8) {
        const int8_t *q = (const int8_t *)W->q + o * I;
        for (; k + 2 <= n; k += 2) {
            const __m512i w = _mm512_loadu_si512(q + k * 32);
            const __mmask64 negative = _mm512_movepi8_mask(w);
            const __m512i magnitude = _mm512_abs_epi8(w);
            const float dw0 = _cvtsh_ss(d[k]), dw1 = _cvtsh_ss(d[k + 1]);
            for (int b = 0; b < NB; b++) {
                const __m512i xv = _mm512_loadu_si512(x + b * I + k * 32);
                const __m512i dot = _mm512_dpbusd_epi32(zero, magnitude, _mm512_mask_sub_epi8(xv, negative, zero, xv));
                const float *s = xs + b * 3 * n;
                const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(dw0 * s[k]), _mm512_set1_ps(dw1 * s[k + 1]));
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[b]);
            }
        }
    } else {
        const uint8_t *q = (const uint8_t *)W->q + o * I / 2;
        const __m256i low = _mm256_set1_epi8(15);
        for (; k + 2 <= n; k += 2) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(q + k * 16));
            const __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            w = _mm512_shuffle_i64x2(w, w, _MM_SHUFFLE(3, 1, 2, 0));
            const float dw0 = _cvtsh_ss(d[k]), dw1 = _cvtsh_ss(d[k + 1]);
            for (int b = 0; b < NB; b++) {
                const __m512i dot = _mm512_dpbusd_epi32(zero, w, _mm512_loadu_si512(x + b * I + k * 32));
                const float *s = xs + b * 3 * n;
                const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(dw0 * s[k]), _mm512_set1_ps(dw1 * s[k + 1]));
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[b]);
            }
        }
        for (int b = 0; b < NB; b++) tail[b] = min_terms_avx2(W->m + o * n, xs + b * 3 * n + n, n);
    }
    for (int b = 0; b < NB; b++) {
        out[b] = _mm512_reduce_add_ps(acc[b]) + tail[b];
        if (k < n) /* an odd last block */
            out[b] += (float)block_dot(W, o, I, k, x + b * I) * (_cvtsh_ss(d[k]) * xs[b * 3 * n + k]);
    }
}

TARGET_VNNI static void qdot_vnni(const QWeight *W, long o, long I, const int8_t *x, const float *xs, float *out, int nb) {
    switch (nb) {
    case 4: qdot_vnni_rows(W, o, I, x, xs, out, 4); break;
    case 3: qdot_vnni_rows(W, o, I, x, xs, out, 3); break;
    case 2: qdot_vnni_rows(W, o, I, x, xs, out, 2); break;
    default: qdot_vnni_rows(W, o, I, x, xs, out, 1);
    }
}

/* The 16-row layout of the VNNI and AVX2 paths (model/quant.py's interleave16 writes it at load): a
 * matrix's rows in groups of 16, a group its blocks in order, a block one record that holds all 16
 * rows' weights and scales, so that a group streams from memory as one sequence:
 *   q4: 256 bytes, byte 64 j + 4 r + t (j < 4, row r < 16, t < 4) holding the block's input 4 j + t
 *       of row r in its low nibble and input 16 + 4 j + t in its high one; then d and m of the 16
 *       rows (half floats): 320 bytes;
 *   q8: 512 bytes, byte 64 j + 4 r + t (j < 8) holding input 4 j + t of row r plus 128 (unsigned);
 *       then d of the 16 rows: 544 bytes.
 * A 512-bit register of weights is then 4 inputs of 16 rows, and one vpdpbusd with the 4 inputs' x
 * broadcast adds into 16 rows' sums at once: no sum across lanes, the scales of 16 rows are one
 * vector, and a register unpacked once serves every row of x. q8's weights + 128 are unsigned (as
 * vpdpbusd wants them); the sum starts at -128 sum(xq), so it is the exact integer dot product. */
#define Q4_RECORD 320
#define Q8_RECORD 544

/* One group's 16 outputs for NB rows of x (xq rows I apart, xs rows 3 I / 32 apart) from its records:
 * y[b, r] (+)= weight row r . x row b. A row's sums run in the same order whatever NB. */
TARGET_VNNI static inline __attribute__((always_inline)) void qgroup_rows(const uint8_t *rec, const int FMT, long I,
                                                                           const int8_t *x, const float *xs,
                                                                           float *y, long y_stride, int accumulate,
                                                                           const int NB) {
    const long n = I / 32, size = FMT == 4 ? Q4_RECORD : Q8_RECORD;
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[8];
    for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();
    for (long k = 0; k < n; k++, rec += size) {
        /* with more than 4 rows of x, prefetch 8 records ahead (a batch-8 step on Zen 4: 1.25x faster);
         * with fewer the loop outruns that lead and the hardware's own prefetch does better (a batch-1
         * step on Zen 4: 8% faster without; benchmarks/probes/q4_prefetch.py) */
        if (NB > 4)
            for (long line = 0; line < size; line += 64)
                _mm_prefetch((const char *)rec + 8 * size + line, _MM_HINT_T0);
        __m512i w[8];
        if (FMT == 4)
            for (int j = 0; j < 4; j++) {
                const __m512i raw = _mm512_loadu_si512(rec + 64 * j);
                w[j] = _mm512_and_si512(raw, low);
                w[4 + j] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            }
        else
            for (int j = 0; j < 8; j++) w[j] = _mm512_loadu_si512(rec + 64 * j);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + (FMT == 4 ? 256 : 512))));
        const __m512 m = FMT == 4 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + 288))) : d;
        for (int b = 0; b < NB; b++) {
            const int32_t *xb = (const int32_t *)(x + b * I + k * 32); /* 4 inputs an int32 */
            const float *s = xs + b * 3 * n;
            int32_t offset = 0;
            if (FMT == 8) memcpy(&offset, s + 2 * n + k, sizeof offset);
            /* two chains of dot products (the latency of one vpdpbusd is several cycles) */
            __m512i even = _mm512_set1_epi32(-128 * offset), odd = _mm512_setzero_si512();
            for (int j = 0; j < 8; j += 2) {
                even = _mm512_dpbusd_epi32(even, w[j], _mm512_set1_epi32(xb[j]));
                odd = _mm512_dpbusd_epi32(odd, w[j + 1], _mm512_set1_epi32(xb[j + 1]));
            }
            const __m512i dot = _mm512_add_epi32(even, odd);
            acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(s[k])), acc[b]);
            if (FMT == 4) acc[b] = _mm512_fmadd_ps(m, _mm512_set1_ps(s[n + k]), acc[b]);
        }
    }
    for (int b = 0; b < NB; b++) {
        float *out = y + b * y_stride;
        _mm512_storeu_ps(out, accumulate ? _mm512_add_ps(_mm512_loadu_ps(out), acc[b]) : acc[b]);
    }
}

/* AVX2 on the same records: a 64-byte register of the VNNI path is two 256-bit halves, rows 0-7 and
 * 8-15, taken one after the other (16 registers of 256 bits hold one half's block). vpmaddubsw
 * multiplies the unsigned weights by x's bytes into 16-bit pairs (q4: at most 2 * 15 * 127 a pair, so
 * the 8 products of a block add up below 2^15), vpmaddwd by ones widens them. q8's weights + 128
 * (up to 255) would saturate a pair: they go as two nibbles, 16 hi + lo. The integers are exact and
 * the float arithmetic after them is qgroup_rows': the same bits as the VNNI path. NB <= 4. */
TARGET_AVX2 static inline __attribute__((always_inline)) void qgroup_rows_avx2(const uint8_t *rec, const int FMT,
                                                                                long I, const int8_t *x,
                                                                                const float *xs, float *y,
                                                                                long y_stride, int accumulate,
                                                                                const int NB) {
    const long n = I / 32, size = FMT == 4 ? Q4_RECORD : Q8_RECORD;
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int half = 0; half < 2; half++) {
        __m256 acc[8]; /* NB <= 4 is used; 8 compiles the shared switch */
        for (int b = 0; b < NB; b++) acc[b] = _mm256_setzero_ps();
        const uint8_t *r = rec + 32 * half;
        for (long k = 0; k < n; k++, r += size) {
            __m256i w[8], hi[8];
            if (FMT == 4)
                for (int j = 0; j < 4; j++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(r + 64 * j));
                    w[j] = _mm256_and_si256(raw, low);
                    w[4 + j] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                }
            else
                for (int j = 0; j < 8; j++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(r + 64 * j));
                    w[j] = _mm256_and_si256(raw, low);
                    hi[j] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                }
            const uint8_t *scales = r - 32 * half + (FMT == 4 ? 256 : 512) + 16 * half;
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)scales));
            const __m256 m = FMT == 4 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 32))) : d;
            for (int b = 0; b < NB; b++) {
                const int32_t *xb = (const int32_t *)(x + b * I + k * 32);
                const float *s = xs + b * 3 * n;
                __m256i pairs = _mm256_setzero_si256(), dot;
                for (int j = 0; j < 8; j++)
                    pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(xb[j])));
                dot = _mm256_madd_epi16(pairs, ones);
                if (FMT == 8) {
                    __m256i high = _mm256_setzero_si256();
                    for (int j = 0; j < 8; j++)
                        high = _mm256_add_epi16(high, _mm256_maddubs_epi16(hi[j], _mm256_set1_epi32(xb[j])));
                    int32_t offset;
                    memcpy(&offset, s + 2 * n + k, sizeof offset);
                    dot = _mm256_add_epi32(dot, _mm256_slli_epi32(_mm256_madd_epi16(high, ones), 4));
                    dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(128 * offset));
                }
                acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(s[k])), acc[b]);
                if (FMT == 4) acc[b] = _mm256_fmadd_ps(m, _mm256_set1_ps(s[n + k]), acc[b]);
            }
        }
        for (int b = 0; b < NB; b++) {
            float *out = y + b * y_stride + 8 * half;
            _mm256_storeu_ps(out, accumulate ? _mm256_add_ps(_mm256_loadu_ps(out), acc[b]) : acc[b]);
        }
    }
}

#define QGROUP(F, FMT, NB) F(rec, FMT, I, x, xs, y, y_stride, accumulate, NB)
#define QGROUP_NB(F, FMT)                                                                                    \
    switch (nb) {                                                                                            \
    case 8: QGROUP(F, FMT, 8); break;                                                                        \
    case 7: QGROUP(F, FMT, 7); break;                                                                        \
    case 6: QGROUP(F, FMT, 6); break;                                                                        \
    case 5: QGROUP(F, FMT, 5); break;                                                                        \
    case 4: QGROUP(F, FMT, 4); break;                                                                        \
    case 3: QGROUP(F, FMT, 3); break;                                                                        \
    case 2: QGROUP(F, FMT, 2); break;                                                                        \
    default: QGROUP(F, FMT, 1);                                                                              \
    }

/* One group's 16 outputs for nb <= 8 rows of x on the VNNI path, and nb <= 4 on the AVX2 one. */
TARGET_VNNI static void qgroup_vnni(const uint8_t *rec, int fmt, long I, const int8_t *x, const float *xs, float *y,
                                    long y_stride, int accumulate, int nb) {
    if (fmt == 4) {
        QGROUP_NB(qgroup_rows, 4)
    } else {
        QGROUP_NB(qgroup_rows, 8)
    }
}

TARGET_AVX2 static void qgroup_avx2(const uint8_t *rec, int fmt, long I, const int8_t *x, const float *xs, float *y,
                                    long y_stride, int accumulate, int nb) {
    if (fmt == 4) {
        QGROUP_NB(qgroup_rows_avx2, 4)
    } else {
        QGROUP_NB(qgroup_rows_avx2, 8)
    }
}
#undef QGROUP_NB
#undef QGROUP

/* y[b, column0 + o ..] (+)= for the `count` matrices Ws stacked along their outputs (rows[m] each, a
 * multiple of 16, every one with rows16), as project_for stacks them, on path isa (VNNI or AVX2): one
 * work-shared loop over all their groups of 16 rows, so q, k and v (or gate and up) meet one barrier,
 * not three. Each group's records are read from memory once and used for every row of x, 8 rows at a
 * time (AVX2: 4, its 16 registers). */
static void qlinear16_for(const QWeight *const *Ws, const long *rows, int count, int isa, const int8_t *xq,
                          const float *xs, float *y, long y_stride, int B, long I, int accumulate) {
    const long n = I / 32;
    const int per = isa == ISA_VNNI ? 8 : 4;
    long groups = 0;
    for (int m = 0; m < count; m++) groups += rows[m] / 16;
#pragma omp for schedule(static)
    for (long j = 0; j < groups; j++) {
        int m = 0;
        long g = j, column0 = 0;
        while (g >= rows[m] / 16) g -= rows[m] / 16, column0 += rows[m], m++;
        const QWeight *W = Ws[m];
        const uint8_t *rec = W->rows16 + g * n * (W->fmt == 4 ? Q4_RECORD : Q8_RECORD);
        for (int b0 = 0; b0 < B; b0 += per) {
            const int nb = B - b0 < per ? B - b0 : per;
            const int8_t *x = xq + (long)b0 * I;
            const float *s = xs + (long)b0 * 3 * n;
            float *out = y + (long)b0 * y_stride + column0 + g * 16;
            if (isa == ISA_VNNI)
                qgroup_vnni(rec, W->fmt, I, x, s, out, y_stride, accumulate, nb);
            else
                qgroup_avx2(rec, W->fmt, I, x, s, out, y_stride, accumulate, nb);
        }
    }
}
#endif

/* Whether the `count` matrices Ws run on qlinear16_for: the VNNI or AVX2 path, and every one interleaved. */
static inline int rows16_ready(const QWeight *const *Ws, int count, int isa) {
    for (int m = 0; m < count; m++)
        if (!Ws[m]->rows16) return 0;
    return isa == ISA_VNNI || isa == ISA_AVX2;
}

/* y[b, o] (+)= sum_i W[o, i] x[b, i] for x already rounded (xq, xs: quantize_rows_for) on path isa;
 * y's rows y_stride apart. Work is shared by weight rows; a row's blocks are read from memory
 * once for all rows of x (4 at a time on the VNNI path). */
static void qlinear_for(const QWeight *W, int isa, const int8_t *xq, const float *xs, float *y, long y_stride, int B,
                        long I, long O, int accumulate) {
    const long n = I / 32;
#pragma omp for schedule(static)
    for (long o = 0; o < O; o++)
        for (int b0 = 0; b0 < B; b0 += 4) {
            const int nb = B - b0 < 4 ? B - b0 : 4;
            const int8_t *x = xq + (long)b0 * I;
            const float *s = xs + (long)b0 * 3 * n;
            float sums[4];
#if defined(__x86_64__) || defined(__i386__)
            if (isa == ISA_VNNI)
                qdot_vnni(W, o, I, x, s, sums, nb);
            else if (isa == ISA_AVX2)
                for (int b = 0; b < nb; b++) sums[b] = qdot_avx2(W, o, I, x + b * I, s + b * 3 * n);
            else
#endif
                for (int b = 0; b < nb; b++) sums[b] = qdot_scalar(W, o, I, x + b * I, s + b * 3 * n);
            for (int b = 0; b < nb; b++) {
                float *out = y + (long)(b0 + b) * y_stride + o;
                *out = (accumulate ? *out : 0.f) + sums[b];
            }
        }
}

/* y = x W^T for one matrix, outside any parallel region: what tests/test_quant.py checks each path with.
 * xq [B, I] int8 and xs [B, 3 I / 32] are the caller's scratch. */
void quant_linear(const QWeight *W, int isa, const float *x, int8_t *xq, float *xs, float *y, int B, long I, long O) {
#pragma omp parallel
    {
        quantize_rows_for(x, xq, xs, B, I);
#if defined(__x86_64__) || defined(__i386__)
        if (rows16_ready(&W, 1, isa))
            qlinear16_for(&W, &O, 1, isa, xq, xs, y, O, B, I, 0);
        else
#endif
            qlinear_for(W, isa, xq, xs, y, O, B, I, O, 0);
    }
}

/* ---------------------------------------------------------------- float weights off the tile unit
 *
 * The projections of bf16 and fp32 weights on CPUs without AMX (or with kernels=avx512 and lower),
 * four paths in one build (per-function target attributes, as the int8 paths above), chosen once
 * at start (float_isa; fast.py's `path`):
 *   F_BF16    AVX512-BF16: bf16 weights against the inputs rounded to bf16 (round_rows_for, as the
 *             tile path rounds them), vdpbf16ps: 32 products an instruction, no conversion of the
 *             weights; fp32 weights take F_AVX512.
 *   F_AVX512  fp32 FMAs on 16 lanes, bf16 weights widened by a shift (linear_avx512_for).
 *   F_AVX2    the same on 8 lanes, for CPUs with AVX2 and FMA only (laptops, older servers).
 *   F_SCALAR  portable C.
 * Each is register-blocked. The layers and the output layer on F_AVX512 and F_BF16 read a copy of
 * their weights packed at load (linear_packed_for, below: outer products, 16 outputs a vector, 32 x 8
 * rows of x a block); the experts of a mixture, and F_AVX2 and F_SCALAR, read them as the model holds
 * them, in dot products: a block of 4 weight rows loaded once for 4 rows of x (AVX2: 2, its 16
 * registers) with 16 (8) sums in registers, reduced across lanes at the end. Either way the block is
 * used for every row of x while it sits in L1, the rows of x taken as many as fit in L2 at a time
 * (rows_in_l2), so that a batch reads the weights from memory once and a long prompt chunk once per
 * few hundred KB of its rows. A row's sums run in the same order whatever it is batched with: its
 * bits do not depend on its batch, on any path. */

enum { F_SCALAR = 0, F_AVX2 = 1, F_AVX512 = 2, F_BF16 = 3 };

/* The best float path this CPU runs, at most `ceiling` (F_*): checked once by fast.py. A CPU with
 * AMX (Intel's, from Sapphire Rapids) keeps F_AVX512 for what its tiles do not take unless the
 * ceiling is F_BF16 itself: there vdpbf16ps ran at about half the rate of widening to fp32 and two
 * FMAs on packed weights (61-90 against 142-156 GFLOP/s a thread: benchmarks/float_paths.py;
 * RESULTS.md, "Batched decode without AMX: packed float weights"), as one vdpbf16ps (32 products)
 * issues where two FMAs (32) do. CPUs with AVX512-BF16 and no tiles (AMD Zen 4 and later) take it:
 * there a 512-bit FMA takes both of the two FMA pipes, vdpbf16ps twice the products for the same. */
int float_isa(int ceiling) {
    int best = F_SCALAR;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = F_AVX2;
#ifdef __AVX512F__ /* linear_avx512_for is built with the build's own flags */
    if (__builtin_cpu_supports("avx512f")) best = F_AVX512;
    if (best == F_AVX512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16") &&
        (ceiling == F_BF16 || !__builtin_cpu_supports("amx-bf16")))
        best = F_BF16;
#endif
#endif
    return best < ceiling ? best : ceiling;
}

/* The portable path: every weight row against every row of x, one sum at a time. */
static void linear_scalar_for(const void *W, int w_bf16, const float *x, float *y, long y_stride, int B, long I,
                              long O, int accumulate) {
#pragma omp for schedule(static)
    for (long o = 0; o < O; o++)
        for (int b = 0; b < B; b++) {
            float sum = 0.f;
            for (long i = 0; i < I; i++) sum += load1(W, w_bf16, o * I + i) * x[b * I + i];
            float *out = y + b * y_stride + o;
            *out = (accumulate ? *out : 0.f) + sum;
        }
}

#if defined(__x86_64__) || defined(__i386__)
#define TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16")))

/* 8 weights of row o from i, in fp32 */
TARGET_AVX2 static inline __m256 load8(const void *W, int w_bf16, long at) {
    if (!w_bf16) return _mm256_loadu_ps((const float *)W + at);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)W + at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* dot_block on 8 lanes: NR weight rows from o against NB rows of x (NR * NB <= 8 sums). */
TARGET_AVX2 static inline __attribute__((always_inline)) void dot_block_avx2(const void *W, const int w_bf16, long I,
                                                                            long o, const float *x, float *y,
                                                                            long y_stride, int accumulate,
                                                                            const int NR, const int NB) {
    __m256 acc[4][2];
    float sums[4][2];
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= I; i += 8) {
        __m256 w[4];
        for (int r = 0; r < NR; r++) w[r] = load8(W, w_bf16, (o + r) * I + i);
        for (int b = 0; b < NB; b++) {
            const __m256 xv = _mm256_loadu_ps(x + b * I + i);
            for (int r = 0; r < NR; r++) acc[r][b] = _mm256_fmadd_ps(w[r], xv, acc[r][b]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) sums[r][b] = hsum8(acc[r][b]);
    for (; i < I; i++)
        for (int r = 0; r < NR; r++)
            for (int b = 0; b < NB; b++) sums[r][b] += load1(W, w_bf16, (o + r) * I + i) * x[b * I + i];
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) {
            float *out = y + b * y_stride + o + r;
            *out = (accumulate ? *out : 0.f) + sums[r][b];
        }
}

TARGET_AVX2 static void linear_avx2_for(const void *W, int w_bf16, const float *x, float *y, long y_stride, int B,
                                        long I, long O, int accumulate) {
    const int chunk = rows_in_l2(I, 4);
    for (int c0 = 0; c0 < B; c0 += chunk) {
        const int c1 = B - c0 < chunk ? B : c0 + chunk;
#pragma omp for schedule(static)
        for (long o = 0; o < O; o += 4)
            for (int b0 = c0; b0 < c1; b0 += 2) {
                const float *xb = x + b0 * I;
                float *yb = y + b0 * y_stride;
                const int two = c1 - b0 >= 2;
                for (long r = o; r < O && r < o + 4; r += o + 4 <= O ? 4 : 1) {
                    const int whole = o + 4 <= O;
                    if (whole && two) dot_block_avx2(W, w_bf16, I, r, xb, yb, y_stride, accumulate, 4, 2);
                    else if (whole) dot_block_avx2(W, w_bf16, I, r, xb, yb, y_stride, accumulate, 4, 1);
                    else if (two) dot_block_avx2(W, w_bf16, I, r, xb, yb, y_stride, accumulate, 1, 2);
                    else dot_block_avx2(W, w_bf16, I, r, xb, yb, y_stride, accumulate, 1, 1);
                }
            }
    }
}

/* x [B, I] fp32 -> xb [B, I] bf16 bits, rounded to nearest even (as the tile path's pack_for). */
TARGET_BF16 static void round_rows_for(const float *x, uint16_t *xb, int B, long I) {
#pragma omp for schedule(static)
    for (int b = 0; b < B; b++) {
        long i = 0;
        for (; i + 32 <= I; i += 32) {
            const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + b * I + i + 16), _mm512_loadu_ps(x + b * I + i));
            _mm512_storeu_si512(xb + b * I + i, (__m512i)h);
        }
        for (; i < I; i++) {
            uint32_t u;
            memcpy(&u, x + b * I + i, sizeof u);
            xb[b * I + i] = (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
        }
    }
}

/* The sums of the lanes of a, b, c and d, one shuffle tree for the four (a quarter of the
 * instructions of four _mm512_reduce_add_ps); each sum's order is fixed, whatever the others hold. */
TARGET_BF16 static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xee));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

/* NR bf16 weight rows from o against NB rows of xb, 32 products an instruction; the last block of
 * a row (I not a multiple of 32) is read through a mask, zeros beyond it. */
TARGET_BF16 static inline __attribute__((always_inline)) void dot_block_bf16(const uint16_t *W, long I, long o,
                                                                            const uint16_t *x, float *y,
                                                                            long y_stride, int accumulate,
                                                                            const int NR, const int NB) {
    __m512 acc[4][4];
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    long i = 0;
    for (; i + 32 <= I; i += 32) {
        __m512i w[4];
        for (int r = 0; r < NR; r++) _mm_prefetch((const char *)(W + (o + r + 8) * I + i), _MM_HINT_T0);
        for (int r = 0; r < NR; r++) w[r] = _mm512_loadu_si512(W + (o + r) * I + i);
        for (int b = 0; b < NB; b++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + b * I + i);
            for (int r = 0; r < NR; r++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)w[r], xv);
        }
    }
    if (i < I) {
        const __mmask32 m = (1u << (I - i)) - 1;
        for (int b = 0; b < NB; b++) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + b * I + i);
            for (int r = 0; r < NR; r++)
                acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)_mm512_maskz_loadu_epi16(m, W + (o + r) * I + i), xv);
        }
    }
    for (int b = 0; b < NB; b++) {
        float sums[4];
        _mm_storeu_ps(sums, reduce4(acc[0][b], NR > 1 ? acc[1][b] : _mm512_setzero_ps(),
                                    NR > 2 ? acc[2][b] : _mm512_setzero_ps(), NR > 3 ? acc[3][b] : _mm512_setzero_ps()));
        for (int r = 0; r < NR; r++) {
            float *out = y + b * y_stride + o + r;
            *out = (accumulate ? *out : 0.f) + sums[r];
        }
    }
}

#define BF16_BLOCKS(NR, o)                                                                        \
    switch (nb) {                                                                                \
    case 4: dot_block_bf16(W, I, o, xb, yb, y_stride, accumulate, NR, 4); break;                 \
    case 3: dot_block_bf16(W, I, o, xb, yb, y_stride, accumulate, NR, 3); break;                 \
    case 2: dot_block_bf16(W, I, o, xb, yb, y_stride, accumulate, NR, 2); break;                 \
    default: dot_block_bf16(W, I, o, xb, yb, y_stride, accumulate, NR, 1);                       \
    }

TARGET_BF16 static void linear_bf16_for(const uint16_t *W, const uint16_t *x, float *y, long y_stride, int B, long I,
                                        long O, int accumulate) {
    FOR_BLOCKS(2, BF16_BLOCKS)
}
#undef BF16_BLOCKS

/* ---- packed weights, an outer product per input
 *
 * On F_AVX512 and F_BF16 the projections read a copy of the weights packed at load (fast.py's
 * pack_float): panels of PANEL = 16 outputs, in which each input's 16 weights lie side by side
 * (bf16: each pair of inputs', 32 words, as vdpbf16ps pairs them), outputs past O and the input
 * past an odd I zero. A block of 2 panels (32 outputs) x up to 8 rows of x keeps 16 sums in
 * registers, each a vector of 16 outputs of one row: a weight vector is loaded once and meets each
 * row's input broadcast, so nothing is summed across lanes and bf16 weights are widened once for 8
 * rows (a shift and a mask for a pair of inputs) where the dot products above widen them per 4 rows
 * and reduce each of their 16 sums across lanes. Each sum is one chain over the inputs in order, in
 * any block: a row's bits do not depend on what it is batched with or where its prompt is cut. */
#define PANEL 16
#define PF_LINES 16 /* prefetch the panels this many cache lines ahead: a third less time at batch 8 */
#define TARGET_512 __attribute__((target("avx512f,avx512bw,avx512dq")))

/* y[b, o] (+)= acc[j][b] for the NO panels from ob, outputs past O left alone */
#define STORE_PANELS()                                                                               \
    for (int j = 0; j < NO; j++) {                                                               \
        const long o = (ob + j) * PANEL;                                                         \
        const __mmask16 m = O - o >= PANEL ? 0xffff : (__mmask16)((1u << (O - o)) - 1);          \
        for (int b = 0; b < NB; b++) {                                                           \
            float *out = y + b * y_stride + o;                                                   \
            const __m512 v = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, out), acc[j][b]) : acc[j][b]; \
            _mm512_mask_storeu_ps(out, m, v);                                                    \
        }                                                                                        \
    }

/* NO panels from ob (fp32 or bf16 weights, I inputs) against NB rows of x, with FMAs. */
TARGET_512 static inline __attribute__((always_inline)) void outer_fma(const void *Wp, const int w_bf16, long I, long ob,
                                                                       const int NO, const float *x, const int NB,
                                                                       float *y, long y_stride, long O, int accumulate) {
    __m512 acc[2][8];
    for (int j = 0; j < NO; j++)
        for (int b = 0; b < NB; b++) acc[j][b] = _mm512_setzero_ps();
    if (!w_bf16) {
        const float *w = (const float *)Wp + ob * PANEL * I;
        for (long i = 0; i < I; i++) {
            __m512 wv[2];
            for (int j = 0; j < NO; j++) _mm_prefetch((const char *)(w + j * PANEL * I + (i + PF_LINES) * PANEL), _MM_HINT_T0);
            for (int j = 0; j < NO; j++) wv[j] = _mm512_loadu_ps(w + j * PANEL * I + i * PANEL);
            for (int b = 0; b < NB; b++) {
                const __m512 xv = _mm512_set1_ps(x[b * I + i]);
                for (int j = 0; j < NO; j++) acc[j][b] = _mm512_fmadd_ps(wv[j], xv, acc[j][b]);
            }
        }
    } else {
        const long Ip = (I + 1) / 2 * 2;
        const uint16_t *w = (const uint16_t *)Wp + ob * PANEL * Ip;
        const __m512i high = _mm512_set1_epi32((int)0xffff0000);
        long i = 0;
        for (; i + 2 <= I; i += 2) {
            __m512 even[2], odd[2]; /* inputs i and i + 1: a bf16 word is the high half of its fp32 */
            for (int j = 0; j < NO; j++) {
                _mm_prefetch((const char *)(w + j * PANEL * Ip + (i + 2 * PF_LINES) * PANEL), _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512(w + j * PANEL * Ip + i * PANEL);
                even[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                odd[j] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
            }
            for (int b = 0; b < NB; b++) {
                const __m512 x0 = _mm512_set1_ps(x[b * I + i]), x1 = _mm512_set1_ps(x[b * I + i + 1]);
                for (int j = 0; j < NO; j++) acc[j][b] = _mm512_fmadd_ps(odd[j], x1, _mm512_fmadd_ps(even[j], x0, acc[j][b]));
            }
        }
        if (i < I)
            for (int j = 0; j < NO; j++) {
                const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(w + j * PANEL * Ip + i * PANEL), 16));
                for (int b = 0; b < NB; b++) acc[j][b] = _mm512_fmadd_ps(even, _mm512_set1_ps(x[b * I + i]), acc[j][b]);
            }
    }
    STORE_PANELS()
}

/* The same for bf16 weights against xb, the rows of x rounded to bf16, with vdpbf16ps: a pair of
 * inputs of 16 outputs an instruction, no widening. */
TARGET_BF16 static inline __attribute__((always_inline)) void outer_dp(const uint16_t *Wp, long I, long ob, const int NO,
                                                                      const uint16_t *xb, const int NB, float *y,
                                                                      long y_stride, long O, int accumulate) {
    __m512 acc[2][8];
    for (int j = 0; j < NO; j++)
        for (int b = 0; b < NB; b++) acc[j][b] = _mm512_setzero_ps();
    const long Ip = (I + 1) / 2 * 2;
    const uint16_t *w = Wp + ob * PANEL * Ip;
    long i = 0;
    for (; i + 2 <= I; i += 2) {
        __m512i wv[2];
        for (int j = 0; j < NO; j++) _mm_prefetch((const char *)(w + j * PANEL * Ip + (i + 2 * PF_LINES) * PANEL), _MM_HINT_T0);
        for (int j = 0; j < NO; j++) wv[j] = _mm512_loadu_si512(w + j * PANEL * Ip + i * PANEL);
        for (int b = 0; b < NB; b++) {
            int pair; /* inputs i and i + 1 of row b */
            memcpy(&pair, xb + b * I + i, sizeof pair);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int j = 0; j < NO; j++) acc[j][b] = _mm512_dpbf16_ps(acc[j][b], (__m512bh)wv[j], xv);
        }
    }
    if (i < I) /* the last input of an odd I, paired with zero */
        for (int j = 0; j < NO; j++) {
            const __m512i wv = _mm512_loadu_si512(w + j * PANEL * Ip + i * PANEL);
            for (int b = 0; b < NB; b++)
                acc[j][b] = _mm512_dpbf16_ps(acc[j][b], (__m512bh)wv, (__m512bh)_mm512_set1_epi32(xb[b * I + i]));
        }
    STORE_PANELS()
}
#undef STORE_PANELS

#define OUTER_ROWS(CALL, NO)                                                                      \
    switch (nb) {                                                                                \
    case 8: CALL(NO, 8); break;                                                                  \
    case 7: CALL(NO, 7); break;                                                                  \
    case 6: CALL(NO, 6); break;                                                                  \
    case 5: CALL(NO, 5); break;                                                                  \
    case 4: CALL(NO, 4); break;                                                                  \
    case 3: CALL(NO, 3); break;                                                                  \
    case 2: CALL(NO, 2); break;                                                                  \
    default: CALL(NO, 1);                                                                        \
    }

/* The loop of the products of `count` (<= 4) packed matrices Ws stacked along their outputs (rows[m]
 * each), written side by side into y, as one work-shared loop (one barrier for q, k and v): blocks
 * of 2 panels of one matrix (its last may be one), each against the rows of x 8 at a time, those
 * rows taken as many as fit in L2 at a time; CALL(NO, NB) runs one block of matrix Wp, O outputs,
 * into ym. */
#define FOR_PANELS(x_size, CALL)                                                                  \
    long first[5] = {0}, at[4] = {0}; /* matrix m's blocks first[m].., its outputs from y + at[m] */ \
    for (int m = 0; m < count; m++) {                                                            \
        first[m + 1] = first[m] + ((rows[m] + PANEL - 1) / PANEL + 1) / 2;                       \
        if (m) at[m] = at[m - 1] + rows[m - 1];                                                  \
    }                                                                                            \
    const int chunk = rows_in_l2(I, x_size);                                                     \
    for (int c0 = 0; c0 < B; c0 += chunk) {                                                      \
        const int c1 = B - c0 < chunk ? B : c0 + chunk;                                          \
        _Pragma("omp for schedule(static)")                                                      \
        for (long t = 0; t < first[count]; t++) {                                                \
            int m = 0;                                                                           \
            while (t >= first[m + 1]) m++;                                                       \
            const long O = rows[m], ob = 2 * (t - first[m]), panels = (O + PANEL - 1) / PANEL;  \
            const void *Wp = Ws[m];                                                              \
            float *ym = y + at[m];                                                               \
            for (int b0 = c0; b0 < c1; b0 += 8) {                                                \
                const int nb = c1 - b0 < 8 ? c1 - b0 : 8;                                        \
                if (panels - ob >= 2) {                                                          \
                    OUTER_ROWS(CALL, 2)                                                          \
                } else {                                                                         \
                    OUTER_ROWS(CALL, 1)                                                          \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    }

TARGET_512 static void packed_fma_for(const void *const *Ws, const long *rows, int count, const int w_bf16,
                                      const float *x, float *y, long y_stride, int B, long I, int accumulate) {
#define FMA_CALL(NO, NB) outer_fma(Wp, w_bf16, I, ob, NO, x + b0 * I, NB, ym + b0 * y_stride, y_stride, O, accumulate)
    FOR_PANELS(4, FMA_CALL)
#undef FMA_CALL
}

TARGET_BF16 static void packed_dp_for(const void *const *Ws, const long *rows, int count, const uint16_t *xb, float *y,
                                      long y_stride, int B, long I, int accumulate) {
#define DP_CALL(NO, NB) outer_dp((const uint16_t *)Wp, I, ob, NO, xb + b0 * I, NB, ym + b0 * y_stride, y_stride, O, accumulate)
    FOR_PANELS(2, DP_CALL)
#undef DP_CALL
}
#undef FOR_PANELS
#undef OUTER_ROWS

/* y[b, o] (+)= sum_i W[o, i] * x[b, i] for `count` (<= 4) matrices Ws packed as above, stacked along
 * their outputs (rows[m] each) and written side by side into y, on F_BF16 (bf16 weights: xb) or else
 * F_AVX512. */
static void linear_packed_for(const void *const *Ws, const long *rows, int count, int w_bf16, int isa, const float *x,
                              const uint16_t *xb, float *y, long y_stride, int B, long I, int accumulate) {
    if (isa == F_BF16 && w_bf16)
        packed_dp_for(Ws, rows, count, xb, y, y_stride, B, I, accumulate);
    else if (w_bf16)
        packed_fma_for(Ws, rows, count, 1, x, y, y_stride, B, I, accumulate);
    else
        packed_fma_for(Ws, rows, count, 0, x, y, y_stride, B, I, accumulate);
}
#endif

/* The float path a product of inputs in fp32 takes (F_BF16 needs them rounded first: linear_for's xb). */
static inline int fp32_isa(int isa) { return isa == F_BF16 ? F_AVX512 : isa; }

/* y[b, o] (+)= sum_i W[o, i] * x[b, i] on float path isa (F_*), rows of y y_stride apart; xb: x
 * rounded to bf16 (round_rows_for), read on F_BF16 with bf16 weights, else unused. */
static void linear_for(const void *W, int w_bf16, int isa, const float *x, const uint16_t *xb, float *y,
                       long y_stride, int B, long I, long O, int accumulate) {
#if defined(__x86_64__) || defined(__i386__)
    if (isa == F_BF16 && w_bf16) {
        linear_bf16_for((const uint16_t *)W, xb, y, y_stride, B, I, O, accumulate);
        return;
    }
    if (isa == F_AVX2) {
        linear_avx2_for(W, w_bf16, x, y, y_stride, B, I, O, accumulate);
        return;
    }
#else
    (void)xb;
#endif
    if (isa >= F_AVX512)
        linear_avx512_for(W, w_bf16, x, y, y_stride, B, I, O, accumulate);
    else
        linear_scalar_for(W, w_bf16, x, y, y_stride, B, I, O, accumulate);
}

/* y = x W^T for one float matrix on path isa, outside any parallel region, on `threads` threads (< 1: the
 * runtime's default): what tests/test_kernel_paths.py checks each path with, and the sentence encoders'
 * linear layers in bf16 on CPUs without tiles (parley/pipeline/embed.py's LinearKernels); W packed (fast.py's
 * pack_float) when `packed`, which F_AVX512 and F_BF16 take. xb [B, I] uint16 is the caller's scratch. */
void float_linear(const void *W, int w_bf16, int isa, int packed, const float *x, uint16_t *xb, float *y, int B, long I,
                  long O, int threads) {
#pragma omp parallel num_threads(threads < 1 ? omp_get_max_threads() : threads)
    {
#if defined(__x86_64__) || defined(__i386__)
        if (isa == F_BF16 && w_bf16) round_rows_for(x, xb, B, I);
        if (packed && isa >= F_AVX512)
            linear_packed_for(&W, &O, 1, w_bf16, isa, x, xb, y, O, B, I, 0);
        else
#endif
            linear_for(W, w_bf16, isa, x, xb, y, O, B, I, O, 0);
    }
}

/* 1 / rms(x) */
static inline float rms_factor(const float *x, int H, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < H; i++) ss += x[i] * x[i];
    return 1.f / sqrtf(ss / H + eps);
}

/* y[b] = x[b] / rms(x[b]) * w */
static void rmsnorm(const float *x, const float *w, float *y, int H, float eps) {
    const float r = rms_factor(x, H, eps);
    for (int i = 0; i < H; i++) y[i] = x[i] * r * w[i];
}

static void rmsnorm_for(const float *x, const float *w, float *y, int B, int H, float eps) {
#pragma omp for schedule(static)
    for (int b = 0; b < B; b++) rmsnorm(x + (long)b * H, w, y + (long)b * H, H, eps);
}

/* rmsnorm_for, then quantize_rows_for of its output, in one work-shared loop (one barrier, not two:
 * a batch-1 step meets ~13 a layer, and with 2 threads each costs about a microsecond of a
 * ~3 ms step). Each block computes its row's factor (H multiply-adds, as rmsnorm does: the same bits). */
static void norm_quantize_for(const float *x, const float *w, float *y, int8_t *xq, float *xs, int B, int H, float eps) {
    const long n = H / 32;
#pragma omp for schedule(static)
    for (long j = 0; j < B * n; j++) {
        const long b = j / n, k = j % n;
        const float *row = x + b * H;
        const float r = rms_factor(row, H, eps);
        float *v = y + b * H + k * 32;
        for (int i = 0; i < 32; i++) v[i] = row[k * 32 + i] * r * w[k * 32 + i];
        quantize_block(v, xq + b * H, xs + b * 3 * n, n, k);
    }
}

/* Rotate one head in place with HF's half-split layout: pairs (i, i + hd/2). */
static inline void rotate(float *v, const float *cos_p, const float *sin_p, int hd) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos_p[i] - b * sin_p[i];
        v[i + half] = b * cos_p[i + half] + a * sin_p[i + half];
    }
}

/* Where the cache keeps row b's key (or value) for kv head g at position s: in the page of
 * row b's page table that holds position s. */
typedef struct {
    const int64_t *table;
    long width, page_size;
} Paging;

static inline long kv_at(const Paging *pg, int b, int g, long s, int nkv, int hd) {
    long page = pg->table[(long)b * pg->width + s / pg->page_size];
    return ((page * nkv + g) * pg->page_size + s % pg->page_size) * hd;
}

/* dst[i] = src[i] for i < n, into fp32, or rounded to the nearest bf16 (as torch's .to()). */
static inline void store_row(void *dst, const float *src, int n, int bf16) {
    if (!bf16) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    uint16_t *out = dst;
    int i = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#endif
    for (; i < n; i++) {
        uint32_t u;
        memcpy(&u, src + i, sizeof u);
        out[i] = isnan(src[i]) ? 0x7fc0 : (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
    }
}

/* qkv: [B, (nh + 2 nkv) * hd], the fused q|k|v projection of one new token per row.
 * Rotate q and k at each row's position, then store k and v at that position of the row's
 * pages, as fp32 or bf16 (kv_bf16). Rows write distinct slots. */
static void rope_store_for(float *qkv, const int64_t *pos, const float *cos_t, const float *sin_t, void *K, void *V,
                           int kv_bf16, int B, int nh, int nkv, int hd, const Paging *pg) {
    long stride = (long)(nh + 2 * nkv) * hd;
    const int size = kv_bf16 ? 2 : 4;
#pragma omp for schedule(static)
    for (int b = 0; b < B; b++) {
        float *row = qkv + b * stride;
        const float *c = cos_t + pos[b] * hd, *s = sin_t + pos[b] * hd;
        for (int h = 0; h < nh + nkv; h++) rotate(row + (long)h * hd, c, s, hd);
        for (int h = 0; h < nkv; h++) {
            long dst = kv_at(pg, b, h, pos[b], nkv, hd) * size;
            store_row((char *)K + dst, row + (long)(nh + h) * hd, hd, kv_bf16);
            store_row((char *)V + dst, row + (long)(nh + nkv + h) * hd, hd, kv_bf16);
        }
    }
}

/* sum_i a[i] * b[i], b fp32 or bf16 (b_bf16) */
static inline float dot(const float *a, const void *b, int b_bf16, int n) {
    int i = 0;
    float d = 0.f;
#ifdef __AVX512F__
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b, b_bf16, i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), load16(b, b_bf16, i + 16), acc1);
    }
    for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b, b_bf16, i), acc0);
    d = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) d += a[i] * load1(b, b_bf16, i);
    return d;
}

/* y[i] += w * x[i], x fp32 or bf16 (x_bf16) */
static inline void axpy(float w, const void *x, int x_bf16, float *y, int n) {
    int i = 0;
#ifdef __AVX512F__
    const __m512 wv = _mm512_set1_ps(w);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(wv, load16(x, x_bf16, i), _mm512_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += w * load1(x, x_bf16, i);
}

/* max_i x[i] for i < n (-inf when n == 0) */
static inline float max_of(const float *x, long n) {
    long i = 0;
    float m = -INFINITY;
#ifdef __AVX512F__
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + i));
    m = _mm512_reduce_max_ps(mv);
#endif
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* exp(x[i] - shift) for i < n, in place; returns their sum. */
static float exp_sum(float *x, long n, float shift) {
    long i = 0;
    float sum = 0.f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    const __m512 sh = _mm512_set1_ps(shift);
    for (; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), sh));
        _mm512_mask_storeu_ps(x + i, k, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) sum += x[i] = expf(x[i] - shift);
    return sum;
}

/* o[j] += sum_s p[j * max_len + s] * v_s for s in [s0, s1) and the G query heads of a group, v_s
 * the value rows (stride `row` bytes); HC chunks of 16 head dims. Each value row is loaded
 * once for all G heads and the sums stay in registers. Same sums, same order, as axpy. */
#ifdef __AVX512F__
static inline __attribute__((always_inline)) void weigh_block(const float *p, long max_len, const char *v, long row,
                                                              int kv_bf16, long s0, long s1, float *o, int hd,
                                                              const int G, const int HC) {
    __m512 acc[4][8];
    for (int j = 0; j < G; j++)
        for (int c = 0; c < HC; c++) acc[j][c] = _mm512_loadu_ps(o + (long)j * hd + c * 16);
    for (long s = s0; s < s1; s++, v += row) {
        __m512 value[8];
        for (int c = 0; c < HC; c++) value[c] = load16(v, kv_bf16, c * 16);
        for (int j = 0; j < G; j++) {
            const __m512 w = _mm512_set1_ps(p[j * max_len + s]);
            for (int c = 0; c < HC; c++) acc[j][c] = _mm512_fmadd_ps(w, value[c], acc[j][c]);
        }
    }
    for (int j = 0; j < G; j++)
        for (int c = 0; c < HC; c++) _mm512_storeu_ps(o + (long)j * hd + c * 16, acc[j][c]);
}
#endif

/* weigh_block for the common shapes (up to 4 heads a group; `width` head dims, 16, 32, 64 or 128, of
 * heads hd apart); 0 when the shape is not one of them and the caller must use axpy. */
static int weigh_values(const float *p, long max_len, const char *v, long row, int kv_bf16, long s0, long s1,
                        float *o, int hd, int width, int group) {
#ifdef __AVX512F__
#define WEIGH(G, HC) weigh_block(p, max_len, v, row, kv_bf16, s0, s1, o, hd, G, HC)
#define WEIGH_HC(G)                                                                                          \
    switch (width) {                                                                                         \
    case 16: WEIGH(G, 1); return 1;                                                                          \
    case 32: WEIGH(G, 2); return 1;                                                                          \
    case 64: WEIGH(G, 4); return 1;                                                                          \
    case 128: WEIGH(G, 8); return 1;                                                                         \
    default: return 0;                                                                                       \
    }
    switch (group) {
    case 1: WEIGH_HC(1)
    case 2: WEIGH_HC(2)
    case 3: WEIGH_HC(3)
    case 4: WEIGH_HC(4)
    default: return 0;
    }
#undef WEIGH_HC
#undef WEIGH
#else
    (void)p, (void)max_len, (void)v, (void)row, (void)kv_bf16, (void)s0, (void)s1, (void)o, (void)hd, (void)width;
    (void)group;
    return 0;
#endif
}

#define MAX_HD 256
#define MAX_GROUP 64 /* the most queries key_scores16 scores at once (query heads a kv head, or a block's) */

#ifdef __AVX512F__
/* p[j * stride + i] = scale * (q[j] . k_i) for the nq queries q[j] and the m <= 16 keys from k, fp32 or
 * bf16 (kv_bf16: widened exactly to fp32 first) (rows `row` bytes apart; hd a multiple of 16, at most
 * MAX_HD): the keys transposed 16 dims at a
 * time, then per query one FMA a dim for all 16 keys at once (the one-query-one-key dot product
 * spends more on summing its lanes than on its products). A key's score is the same two chains
 * (even and odd dims) whatever m, nq and the block's other keys and queries are, so a prompt row
 * and a decode row get the same bits. */
static void key_scores16(const char *k, long row, int m, int kv_bf16, int hd, const float *const *q, int nq,
                         float scale, float *p, long stride) {
    __m512 kt[MAX_HD];
    for (int d0 = 0; d0 < hd; d0 += 16) {
        __m512i rows[16], cols[16];
        for (int i = 0; i < 16; i++)
            rows[i] = i >= m ? _mm512_setzero_si512()
                      : kv_bf16 ? _mm512_slli_epi32(
                                      _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(k + i * row + d0 * 2))), 16)
                                : _mm512_loadu_si512(k + i * row + d0 * 4);
        transpose16(rows, cols);
        for (int d = 0; d < 16; d++) kt[d0 + d] = _mm512_castsi512_ps(cols[d]);
    }
    const __mmask16 keep = (__mmask16)((1u << m) - 1);
    for (int j = 0; j < nq; j++) {
        __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
        for (int d = 0; d < hd; d += 2) {
            even = _mm512_fmadd_ps(_mm512_set1_ps(q[j][d]), kt[d], even);
            odd = _mm512_fmadd_ps(_mm512_set1_ps(q[j][d + 1]), kt[d + 1], odd);
        }
        _mm512_mask_storeu_ps(p + j * stride, keep, _mm512_mul_ps(_mm512_add_ps(even, odd), _mm512_set1_ps(scale)));
    }
}

/* The scores of keys s .. end - 1 (one page's run from k) by key_scores16 where it applies (keys off
 * the tiles, fp32 or bf16; bf16 keys on an AMX step keep the tile path's own scoring: `amx` is the
 * step's flag, the same for its decode rows and prompt rows), 16 at a time; returns where it stopped
 * (s: it does not apply). */
static long key_scores_run(const char *k, long row, long s, long end, int kv_bf16, int amx, int hd,
                           const float *const *q, int nq, float scale, float *p, long stride) {
    if ((kv_bf16 && amx) || hd % 16 || hd > MAX_HD) return s;
    for (; s < end; s += 16, k += 16 * row)
        key_scores16(k, row, end - s < 16 ? (int)(end - s) : 16, kv_bf16, hd, q, nq, scale, p + s, stride);
    return s;
}
#endif

/* o[j][d] = sum over lo <= s < n of p[j * p_stride + s] * v_s[d] for the group heads j (o: group rows
 * of hd) and the head dims d0 <= d < d0 + width, v_s the value rows of kv head g of row b: a page of
 * consecutive positions at a time, the next page's values fetched early (pages lie anywhere in the
 * pool). A dim's sum runs in the same order whatever d0 and width are (d0 and width multiples of 16,
 * or the whole head). */
static void weigh_dims(const float *p, long p_stride, const void *V, int kv_bf16, const Paging *pg, long b, int g,
                       int nkv, int hd, long lo, long n, float *o, int group, int d0, int width) {
    const long run = pg->page_size, size = kv_bf16 ? 2 : 4, row = hd * size;
    for (int j = 0; j < group; j++)
        for (int d = d0; d < d0 + width; d++) o[(long)j * hd + d] = 0.f;
    for (long s0 = lo / run * run; s0 < n; s0 += run) {
        const long start = s0 > lo ? s0 : lo;
        const char *v = (const char *)V + (kv_at(pg, b, g, start, nkv, hd) + d0) * size;
        if (s0 + run < n) {
            const char *next = (const char *)V + (kv_at(pg, b, g, s0 + run, nkv, hd) + d0) * size;
            for (long r = 0; r < run; r++)
                for (long at = 0; at < width * size; at += 64) __builtin_prefetch(next + r * row + at, 0, 3);
        }
        const long s1 = n < s0 + run ? n : s0 + run;
        if (!weigh_values(p, p_stride, v, row, kv_bf16, start, s1, o + d0, hd, width, group))
            for (long s = start; s < s1; s++, v += row)
                for (int j = 0; j < group; j++) axpy(p[j * p_stride + s], v, kv_bf16, o + (long)j * hd + d0, width);
    }
}

/* weigh_dims over the whole head. */
static void weigh_runs(const float *p, long p_stride, const void *V, int kv_bf16, const Paging *pg, long b, int g,
                       int nkv, int hd, long lo, long n, float *o, int group) {
    weigh_dims(p, p_stride, V, kv_bf16, pg, b, g, nkv, hd, lo, n, o, group, 0, hd);
}

/* The first position a query at `pos` sees: in a sliding layer (window > 0) the last `window`
 * positions, its own included; else all. */
static inline long first_seen(long pos, long window) { return window > 0 && pos >= window ? pos - window + 1 : 0; }

/* Where the keys loop of a query that sees from lo on starts: at the block of 16 (counted from the
 * start of lo's page) that holds lo, so that a position's score is computed the same way (one key
 * tile, or one dot product) for every row and block that reads it. */
static inline long keys_from(long lo, long run) { return lo / run * run + (lo % run) / 16 * 16; }

/* Softmax of the scores p[lo..n) in place, soft-capped first (cap > 0: cap tanh(p / cap), Gemma 2's
 * attention soft-capping); p[from..lo) are set to zero (weigh_tiles reads weights from `from` on). */
static void softmax_span(float *p, long from, long lo, long n, float cap) {
    if (cap > 0.f)
        for (long s = lo; s < n; s++) p[s] = cap * tanhf(p[s] / cap);
    const float m = max_of(p + lo, n - lo), r = 1.f / exp_sum(p + lo, n - lo, m);
    for (long s = lo; s < n; s++) p[s] *= r;
    for (long s = from; s < lo; s++) p[s] = 0.f;
}

#ifdef HAVE_AMX
/* Queries as the right operand of keys . queries: for each block of 32 head dims a tile of
 * 16 pairs x 16 columns, 1 KB each, contiguous. Column j holds query j: q + j * hd for the
 * group's heads of one row (pack_queries), or those of several rows (pack_columns, row i's
 * heads at rows[i]); columns past the last query are zero. */
static void pack_column(const float *q, int j, int hd, uint32_t *qp) {
    for (int d = 0; d < hd; d += 2) {
        float two[2] = {q[d], q[d + 1]};
        uint16_t h[2];
        store_row(h, two, 2, 1);
        qp[(d / 32) * 256 + (d % 32) / 2 * 16 + j] = h[0] | (uint32_t)h[1] << 16;
    }
}

static void pack_queries(const float *q, int group, int hd, uint32_t *qp) {
    memset(qp, 0, (size_t)hd / 2 * 16 * sizeof *qp);
    for (int j = 0; j < group; j++) pack_column(q + (long)j * hd, j, hd, qp);
}

static void pack_columns(const float *const *rows, int n_rows, int group, int hd, uint32_t *qp) {
    memset(qp, 0, (size_t)hd / 2 * 16 * sizeof *qp);
    for (int i = 0; i < n_rows; i++)
        for (int j = 0; j < group; j++) pack_column(rows[i] + (long)j * hd, i * group + j, hd, qp);
}

/* c[r][j] = key r . query j for the 16 bf16 keys at k (a row apart) and the packed queries qp. */
static inline void key_tile(const char *k, long row, int hd, const uint32_t *qp, float c[16][16]) {
    _tile_zero(0);
    for (int kb = 0; kb < hd / 32; kb++) {
        _tile_loadd(4, k + kb * 64, row);
        _tile_loadd(6, qp + kb * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
    }
    _tile_stored(0, c, 64);
}

/* rows[r]: the bf16 value row of position s + r (from head dim d0 on) of kv head g of table row b,
 * NULL from position N on; one page lookup a page. */
static void value_rows(const void *V, const Paging *pg, long b, int g, long s, long N, int nkv, int hd, int d0,
                       const uint16_t *rows[32]) {
    const long run = pg->page_size;
    long in_run = s % run;
    const uint16_t *at = NULL;
    for (int r = 0; r < 32; r++, in_run = in_run + 1 == run ? 0 : in_run + 1) {
        if (s + r >= N) {
            rows[r] = NULL;
            continue;
        }
        if (r == 0 || in_run == 0) at = (const uint16_t *)V + kv_at(pg, b, g, s + r, nkv, hd) + d0;
        rows[r] = at;
        at += hd;
    }
}

/* o[i][d] = sum over s < n[i] of w[i][s] * v_s[d], for the m (<= 16) rows of attention
 * weights w (fp32, row i at p + i * p_stride; rounded to bf16 here) and the bf16 value rows v_s of
 * kv head g of table row b: on the tile unit, 32 positions by 16 rows a step, the values packed in
 * pairs of positions for it, from position `from` (a multiple of 32; the weights before it count
 * as zero, so the sums are those from 0) on. Weights from n[i] on count as zero, values from max n[i] on are not read.
 * A row's sums run in the same order whatever the other rows are. */
static void weigh_tiles(const float *p, long p_stride, int m, long from, const long *n, const void *V, const Paging *pg,
                        long b, int g, int nkv, int hd, float *const *o) {
    long N = 0;
    for (int i = 0; i < m; i++) N = n[i] > N ? n[i] : N;
    uint16_t weights[16][32], values[4][16][32];
    float sums[16][16];
    const uint16_t *rows[32], *ahead[32];
    memset(weights, 0, sizeof weights);
    for (int d0 = 0; d0 < hd; d0 += 64) { /* up to 4 sums tiles (64 head dims) a pass */
        const int parts = hd - d0 >= 64 ? 4 : (hd - d0) / 16;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (long s = from; s < N; s += 32) {
            for (int i = 0; i < m; i++) { /* weights s .. s + 31 of row i, zero from n[i] on */
                const long left = n[i] - s;
                const __mmask16 lo = left <= 0 ? 0 : left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
                const __mmask16 hi = left <= 16 ? 0 : left >= 32 ? 0xffff : (__mmask16)((1u << (left - 16)) - 1);
                const float *w = p + i * p_stride + s;
                _mm512_storeu_si512(weights[i], (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, w + 16),
                                                                            _mm512_maskz_loadu_ps(lo, w)));
            }
            if (s == from) value_rows(V, pg, b, g, from, N, nkv, hd, d0, rows);
            else memcpy(rows, ahead, sizeof rows);
            value_rows(V, pg, b, g, s + 32, N, nkv, hd, d0, ahead);
            for (int r = 0; r < 32 && ahead[r]; r++) /* pages lie anywhere in the pool: ask for the next rows now */
                for (int at = 0; at < parts * 32; at += 64) __builtin_prefetch((const char *)ahead[r] + at, 0, 3);
            for (int t = 0; t < 16; t++) { /* row t of a values tile: (v[s + 2t][d], v[s + 2t + 1][d]) */
                const uint16_t *even = rows[2 * t], *odd = rows[2 * t + 1];
                for (int c = 0; c < parts; c++) {
                    const __m512i e = even ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(even + c * 16)))
                                           : _mm512_setzero_si512();
                    const __m512i h = odd ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(odd + c * 16)))
                                          : _mm512_setzero_si512();
                    _mm512_storeu_si512(values[c][t], _mm512_or_si512(e, _mm512_slli_epi32(h, 16)));
                }
            }
            _tile_loadd(4, weights, 64);
            for (int c = 0; c < parts; c++) {
                _tile_loadd(5, values[c], 64);
                switch (c) { /* the tile number must be a constant */
                case 0: _tile_dpbf16ps(0, 4, 5); break;
                case 1: _tile_dpbf16ps(1, 4, 5); break;
                case 2: _tile_dpbf16ps(2, 4, 5); break;
                default: _tile_dpbf16ps(3, 4, 5); break;
                }
            }
        }
        for (int c = 0; c < parts; c++) {
            switch (c) {
            case 0: _tile_stored(0, sums, 64); break;
            case 1: _tile_stored(1, sums, 64); break;
            case 2: _tile_stored(2, sums, 64); break;
            default: _tile_stored(3, sums, 64); break;
            }
            for (int i = 0; i < m; i++) memcpy(o[i] + d0 + c * 16, sums[i], 64);
        }
    }
}
#endif

/* The scores p[j * max_len + s] = scale * (q_j . k_s) of the group query heads q_j of row b (kv head g)
 * for the positions a <= s < e, a where a block of 16 of the keys loop starts (keys_from) and e such a
 * place or the row's end: page by page, 16 slots at once where they can be, so that a position's score
 * is the same bits whichever span it is computed in. qp: the packed queries when `tiles`. */
static void key_scores_span(const float *q, const void *K, int kv_bf16, int amx, int tiles, const uint32_t *qp,
                            const Paging *pg, long b, int g, int nkv, int hd, int group, float scale, long a, long e,
                            float *p, long max_len) {
    const long run = pg->page_size, size = kv_bf16 ? 2 : 4, row = hd * size;
    (void)tiles, (void)qp, (void)amx;
    for (long s0 = a / run * run; s0 < e; s0 += run) {
        long s = s0 > a ? s0 : a;
        const long end = e < s0 + run ? e : s0 + run;
        const char *k = (const char *)K + kv_at(pg, b, g, s, nkv, hd) * size;
        if (s0 + run < e) { /* pages lie anywhere in the pool: fetch the next one's keys early */
            const char *next = (const char *)K + kv_at(pg, b, g, s0 + run, nkv, hd) * size;
            for (long at = 0; at < run * row; at += 64) __builtin_prefetch(next + at, 0, 3);
        }
#ifdef HAVE_AMX
        /* 16 slots at once while all 16 lie in this run's memory (slots from `end` on are read, not used) */
        for (; tiles && s < end && s + 16 <= s0 + run; s += 16, k += 16 * row) {
            float c[16][16];
            key_tile(k, row, hd, qp, c);
            for (int r = 0; r < 16 && s + r < end; r++)
                for (int j = 0; j < group; j++)
                    p[j * max_len + s + r] = c[r][j] * scale;
        }
#endif
#ifdef __AVX512F__
        if (s < end) {
            const float *qs[MAX_GROUP];
            for (int j = 0; j < group && j < MAX_GROUP; j++) qs[j] = q + (long)j * hd;
            const long at = group <= MAX_GROUP ? key_scores_run(k, row, s, end, kv_bf16, amx, hd, qs, group, scale, p,
                                                                max_len) : s;
            k += (at - s) * row, s = at;
        }
#endif
        for (; s < end; s++, k += row)
            for (int j = 0; j < group; j++)
                p[j * max_len + s] = dot(q + (long)j * hd, k, kv_bf16, hd) * scale;
    }
}

/* Whether attend_for shares a step's attention among `threads` in three phases rather than by (row,
 * kv head): when those leave threads idle (fewer than four times the threads and not a multiple of
 * them) and some row sees at least SPLIT_SEEN positions. Measured at batch 1 on 2 threads
 * (benchmarks/probes/attn_split.py, three runs): at 512 positions the phases made a step 5% faster on
 * SmolLM2's kept 4-bit file and 6-12% on Gemma 3 270M's (one kv head), -1% to +1.5% in bf16; at 16
 * positions, with two more barriers a layer and little attention, -5% to +4%. The bound of four times
 * the threads is a guess (no CPU with more than 2 cores was at hand). split: 1 always (off the tiles),
 * 0 never, -1 as said. */
#define SPLIT_SEEN 512
int attend_splits(int split, int tiles, long units, int threads, long seen) {
    if (tiles || split == 0) return 0;
    return split > 0 || (threads > 1 && units % threads && units < 4L * threads && seen >= SPLIT_SEEN);
}

/* One query per row and head against the row's positions 0..pos[b] in its pages (in a sliding
 * layer, window > 0, only the last `window` of them; scores soft-capped at cap > 0). Work is shared by (row, kv head): the `group` query heads that
 * read one kv head go together, so each key and value is loaded once for all of them.
 * q is read from qkv rows (stride q_stride); out is [B, nh * hd]; scratch holds
 * B * nh * max_len floats. With too few (row, kv head) units for the threads (a batch of one: SmolLM2's 3
 * kv heads on 2 threads leave one idle a third of the time, Gemma 3 270M's one kv head all of it) and long
 * rows, attend_splits says to share the work in three phases instead, each a loop of its own: the
 * scores by spans of positions, the softmax by query head, the weighted values by spans of head dims.
 * Each score, softmax and value sum is computed by the same code in the same order either way, so the
 * output has the same bits whichever way the work was shared (tests/test_kernel_paths.py). */
static void attend_for(const float *qkv, long q_stride, const void *K, const void *V, int kv_bf16, int amx,
                       float *out, float *scratch, int B, int nh, int nkv, int hd, long max_len, float scale,
                       const int64_t *pos, const Paging *pg, long window, float cap, int split) {
    const int group = nh / nkv;
    /* query . key products on the tile unit: bf16 keys, whole tiles of head dims, <= 16 heads a group */
    const int tiles = amx && kv_bf16 && hd % 32 == 0 && hd <= MAX_HD && group <= 16;
    const long run = pg->page_size, units = (long)B * nkv;
    long seen = 0; /* the most positions a row sees */
    for (int b = 0; b < B; b++)
        seen = pos[b] + 1 - first_seen(pos[b], window) > seen ? pos[b] + 1 - first_seen(pos[b], window) : seen;
    if (attend_splits(split, tiles, units, omp_get_num_threads(), seen)) {
        /* at least two units a thread a phase; forced (split > 0), as if for 4 threads at least, so
         * that the spans and parts are several on any machine */
        const int threads = split > 0 && omp_get_num_threads() < 4 ? 4 : omp_get_num_threads();
        const long spans = (2L * threads + units - 1) / units;
        int parts = hd % 16 ? 1 : hd / 16; /* spans of head dims: whole blocks of 16, parts dividing hd / 16 */
        while (parts > 1 && (parts > spans || (hd / 16) % parts)) parts--;
#pragma omp for schedule(static)
        for (long u = 0; u < units * spans; u++) {
            const long bg = u / spans, i = u % spans;
            const int b = bg / nkv, g = bg % nkv;
            const long n = pos[b] + 1, lo = first_seen(pos[b], window), keys = keys_from(lo, run);
            const long at = i == 0 ? keys : keys_from(lo + (n - lo) * i / spans, run);
            const long end = i + 1 == spans ? n : keys_from(lo + (n - lo) * (i + 1) / spans, run);
            if (at < end)
                key_scores_span(qkv + b * q_stride + (long)g * group * hd, K, kv_bf16, amx, 0, NULL, pg, b, g, nkv, hd,
                                group, scale, at > keys ? at : keys, end,
                                scratch + ((long)b * nh + (long)g * group) * max_len, max_len);
        }
#pragma omp for schedule(static)
        for (long bh = 0; bh < (long)B * nh; bh++) {
            const int b = bh / nh;
            const long lo = first_seen(pos[b], window);
            softmax_span(scratch + bh * max_len, lo, lo, pos[b] + 1, cap);
        }
#pragma omp for schedule(static)
        for (long u = 0; u < units * parts; u++) {
            const long bg = u / parts;
            const int b = bg / nkv, g = bg % nkv, width = hd / parts;
            weigh_dims(scratch + ((long)b * nh + (long)g * group) * max_len, max_len, V, kv_bf16, pg, b, g, nkv, hd,
                       first_seen(pos[b], window), pos[b] + 1, out + (long)b * nh * hd + (long)g * group * hd, group,
                       (int)(u % parts) * width, width);
        }
        return;
    }
#pragma omp for schedule(static)
    for (long bg = 0; bg < units; bg++) {
        const int b = bg / nkv, g = bg % nkv;
        const long n = pos[b] + 1, lo = first_seen(pos[b], window), keys = keys_from(lo, run);
        const float *q = qkv + b * q_stride + (long)g * group * hd;
        float *p = scratch + ((long)b * nh + (long)g * group) * max_len; /* group rows of max_len */
        float *o = out + (long)b * nh * hd + (long)g * group * hd;       /* group heads, contiguous */
        uint32_t *qp = NULL;
#ifdef HAVE_AMX
        uint32_t packed[MAX_HD / 2 * 16];
        if (tiles) pack_queries(q, group, hd, packed), qp = packed;
#endif
        key_scores_span(q, K, kv_bf16, amx, tiles, qp, pg, b, g, nkv, hd, group, scale, keys, n, p, max_len);
        const long from = tiles ? lo / 32 * 32 : lo;
        for (int j = 0; j < group; j++) softmax_span(p + j * max_len, from, lo, n, cap);
#ifdef HAVE_AMX
        if (tiles) { /* values on the tile unit too: the same sums as a prompt row's (attend_block) */
            long lens[16];
            float *heads[16];
            for (int j = 0; j < group; j++) lens[j] = n, heads[j] = o + (long)j * hd;
            weigh_tiles(p, max_len, group, from, lens, V, pg, b, g, nkv, hd, heads);
            continue;
        }
#endif
        weigh_runs(p, max_len, V, kv_bf16, pg, b, g, nkv, hd, lo, n, o, group);
    }
}

/* Causal attention of a prompt chunk's rows: the rows r0 .. r0 + n_rows - 1 (at consecutive
 * positions from pos[r0], all of one sequence, its pages in table row r0) against their kv head
 * g, for the group query heads of each row, over the keys and values stored for positions
 * 0 .. pos[row] of each. The block's n_rows * group queries (<= 16) go through the keys together,
 * 16 positions by 16 queries a tile (or one dot product at a time without tiles); then they weigh
 * the values together, as attend_for does for one row's heads (weigh_tiles on the tile unit, so a
 * prompt row and a decode row get the same bits). p: 16 rows of max_len floats of scratch. */
static void attend_block(const float *qkv, long q_stride, const void *K, const void *V, int kv_bf16, int amx,
                         int tiles, int value_tiles, float *out, float *p, int nh, int nkv, int hd, long max_len, float scale,
                         const int64_t *pos, const Paging *pg, long r0, int n_rows, int g, long window, float cap) {
    const int group = nh / nkv;
    const long run = pg->page_size, size = kv_bf16 ? 2 : 4, row = hd * size, n = pos[r0 + n_rows - 1] + 1;
    /* the first row sees the earliest position; the other rows' scores before their own are zeroed */
    const long lo = first_seen(pos[r0], window), keys = keys_from(lo, run), from = value_tiles ? lo / 32 * 32 : lo;
    const float *q[16];
    for (int i = 0; i < n_rows; i++) q[i] = qkv + (r0 + i) * q_stride + (long)g * group * hd;
#ifdef HAVE_AMX
    uint32_t qp[MAX_HD / 2 * 16];
    if (tiles) pack_columns(q, n_rows, group, hd, qp);
#else
    (void)tiles;
#endif
    for (long s0 = keys / run * run; s0 < n; s0 += run) {
        long s = s0 > keys ? s0 : keys;
        const char *k = (const char *)K + kv_at(pg, r0, g, s, nkv, hd) * size;
#ifdef HAVE_AMX
        for (; tiles && s < n && s + 16 <= s0 + run; s += 16, k += 16 * row) {
            float c[16][16];
            key_tile(k, row, hd, qp, c);
            __m512i by_position[16], by_query[16]; /* c[r][i]: position s + r, query i; transposed */
            for (int r = 0; r < 16; r++) by_position[r] = _mm512_loadu_si512(c[r]);
            transpose16(by_position, by_query);
            const __m512 sc = _mm512_set1_ps(scale);
            for (int i = 0; i < n_rows * group; i++) /* positions from n on are scratch, not read */
                _mm512_storeu_ps(p + i * max_len + s, _mm512_mul_ps(_mm512_castsi512_ps(by_query[i]), sc));
        }
#endif
#ifdef __AVX512F__
        if (s < n && n_rows * group <= MAX_GROUP) {
            const float *qs[MAX_GROUP];
            for (int i = 0; i < n_rows; i++)
                for (int j = 0; j < group; j++) qs[i * group + j] = q[i] + (long)j * hd;
            const long at = key_scores_run(k, row, s, n < s0 + run ? n : s0 + run, kv_bf16, amx, hd, qs,
                                           n_rows * group, scale, p, max_len);
            k += (at - s) * row, s = at;
        }
#endif
        for (; s < n && s < s0 + run; s++, k += row)
            for (int i = 0; i < n_rows; i++)
                for (int j = 0; j < group; j++)
                    p[(i * group + j) * max_len + s] = dot(q[i] + (long)j * hd, k, kv_bf16, hd) * scale;
    }
    long lens[16], firsts[16];
    float *heads[16];
    for (int i = 0; i < n_rows; i++) {
        const long n_i = pos[r0 + i] + 1; /* causal: row i sees positions up to its own */
        firsts[i] = first_seen(pos[r0 + i], window);
        float *p_i = p + (long)i * group * max_len, *o = out + (r0 + i) * (long)nh * hd + (long)g * group * hd;
        for (int j = 0; j < group; j++) {
            softmax_span(p_i + j * max_len, from, firsts[i], n_i, cap);
            lens[i * group + j] = n_i, heads[i * group + j] = o + (long)j * hd;
        }
    }
#ifdef HAVE_AMX
    if (value_tiles) {
        weigh_tiles(p, max_len, n_rows * group, from, lens, V, pg, r0, g, nkv, hd, heads);
        return;
    }
#else
    (void)value_tiles;
#endif
    for (int i = 0; i < n_rows; i++)
        weigh_runs(p + (long)i * group * max_len, max_len, V, kv_bf16, pg, r0, g, nkv, hd, firsts[i], lens[i * group],
                   heads[i * group], group);
}

/* gu: [B, 2I] = gate | up; h[b] = silu(gate) * up, or gelu(gate) * up with `gelu` */
static void act_mul_for(const float *gu, float *h, int B, long I, int gelu) {
#pragma omp for schedule(static)
    for (int b = 0; b < B; b++) {
        const float *g = gu + b * 2 * I, *u = g + I;
        float *y = h + b * I;
        long i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= I; i += 16) _mm512_storeu_ps(y + i, act_mul16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i), gelu));
#endif
        for (; i < I; i++) y[i] = act_mul1(g[i], u[i], gelu);
    }
}

/* act_mul_for, then quantize_rows_for of its output, in one work-shared loop (I % 32 == 0: each
 * block's 16-lane halves are act_mul_for's, the same bits). */
static void act_quantize_for(const float *gu, float *h, int8_t *xq, float *xs, int B, long I, int gelu) {
    const long n = I / 32;
#pragma omp for schedule(static)
    for (long j = 0; j < B * n; j++) {
        const long b = j / n, k = j % n;
        const float *g = gu + b * 2 * I + k * 32, *u = g + I;
        float *y = h + b * I + k * 32;
        int i = 0;
#ifdef __AVX512F__
        for (; i < 32; i += 16) _mm512_storeu_ps(y + i, act_mul16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i), gelu));
#endif
        for (; i < 32; i++) y[i] = act_mul1(g[i], u[i], gelu);
        quantize_block(y, xq + b * I, xs + b * 3 * n, n, k);
    }
}

/* Pointers to one layer's weights (nn.Linear layout, or QWeight when sh->quant) and its slice of the KV cache;
 * index: the layer's number (which Lora of a row's adapter applies). The families' variations
 * (model/transformer.py; NULL or 0 where a plain Llama layer has none), all fp32: the biases of q,
 * k, v (Qwen2) and o; RMSNorm weights of each q and k head (Qwen3, Gemma 3); Gemma's norms of the
 * attention's and the MLP's outputs (ln2 is then its pre-feedforward norm); the layer's own rotary
 * tables (Gemma 3's sliding layers: another base; NULL: the step's); its sliding window. */
typedef struct {
    const void *q, *k, *v, *o, *gate, *up, *down;
    const float *ln1, *ln2;
    void *K, *V; /* fp32, or bf16 with kv_bf16 */
    long index;
    const float *bq, *bk, *bv, *bo, *q_norm, *k_norm, *post_attn, *post_ff, *cos, *sin;
    long window;
    /* a mixture of experts in place of the MLP (router: NULL for a dense layer): the router [n_experts, H];
     * experts[3 e ..]: expert e's gate, up and down [expert_inter wide]; renorm: the top_k weights
     * renormalized to sum to one (Mixtral, Qwen3-MoE's norm_topk_prob); a shared expert (Qwen2-MoE:
     * shared[3] gate, up, down, shared_inter wide) gated by sigmoid(shared_router . x) ([1, H]) */
    const void *router, *const *experts, *const *shared, *shared_router;
    long n_experts, top_k, expert_inter, shared_inter, renorm;
} Layer;


/* Scratch activations, fp32: x, h [B, H]; qkv [B, (nh + 2 nkv) hd]; att [B, nh hd];
 * gu [B, 2 inter]; act [B, inter]; scores [B, nh, max_len]; logits [B, vocab]; and for the
 * tile path xp [max(H, inter) / 2, B rounded up to 16], the packed input of a projection (the F_BF16
 * path: that input rounded to bf16, [B, I]), and xp_act (as large), the MLP's packed activations
 * written by amx_gate_up_for. */
typedef struct {
    float *x, *h, *qkv, *att, *gu, *act, *scores, *logits;
    uint32_t *xp, *xp_act;
    int8_t *xq; /* with quantized weights: the projection's input rounded to int8 [B, max(H, inter)] */
    float *xs;  /* and its blocks' scales and sums [B, 3 max(H, inter) / 32] (quantize_rows_for) */
    const Lora *const *lora; /* NULL, or each row's adapter: its Lora of every layer [n_layers] (NULL: none) */
    const int64_t *lora_plan; /* the rows with one, in units of up to LORA_UNIT rows of one adapter:
                               * [units, then per unit: count, LORA_UNIT row indices] */
    /* the tile path's plan instead (lora_down_tiles_for): segments, the rows of one 16-row block with one
     * adapter, block by block: lora_blocks [Bp / 16 + 1] (block nb's segments are lora_blocks[nb] ..
     * lora_blocks[nb + 1] - 1), lora_segs [segments, 3] (its adapter's Lora array, block, mask of rows),
     * and lora_u [segments, 3, LORA_U_TILES, 256] each segment's packed u of up to 3 targets */
    const int64_t *lora_blocks, *lora_segs;
    uint32_t *lora_u;
    float *route;             /* mixture of experts: [B, n_experts] router weights (-1: expert not chosen) */
    float *moe_x, *moe_y;     /* [B, H]: the rows one expert gets, and its outputs */
    int64_t *moe_rows;        /* [n_experts + 1 + B top_k]: where each expert's rows start, then the rows */
} Buffers;

/* amx: run the projections on the tile unit (bf16 weights, every dimension whole tiles,
 * amx_enable() said yes: fast.py checks all three). kv_bf16: the cache holds bf16. */
typedef struct {
    int B, H, nh, nkv, hd, n_layers, w_bf16, amx, kv_bf16;
    long inter, vocab, max_len;
    float eps;
    int quant, isa; /* quant: the weights are QWeight (layers and output layer), run on path isa (ISA_*) */
    float scale, attn_cap; /* attention scale (0: 1 / sqrt(hd)) and score soft-capping (0: none) */
    int gelu;              /* the MLP's gate: gelu (tanh approximation; Gemma's GeGLU), else silu */
    int fisa;              /* float weights off the tiles: the path (F_*) their projections run on */
    int packed;            /* and the layers' and output layer's weights are packed (linear_packed_for) */
    int split_attn;        /* decode rows' attention in phases: 1 always, 0 never, -1 when threads would idle */
} Shape;

static inline float attention_scale(const Shape *sh) { return sh->scale > 0.f ? sh->scale : 1.f / sqrtf((float)sh->hd); }

/* The input x [B, I] of the projections that follow: packed for the tile unit, rounded to bf16 into
 * buf->xp for the F_BF16 path, rounded to int8 for quantized weights, or as is. */
typedef struct {
    const float *x;
    long I;
} Input;

static Input input_for(const Shape *sh, const Buffers *buf, const float *x, long I) {
    if (sh->quant) quantize_rows_for(x, buf->xq, buf->xs, sh->B, I);
#ifdef HAVE_AMX
    if (sh->amx) pack_for(x, buf->xp, sh->B, (sh->B + 15) / 16 * 16, I);
#endif
#if defined(__x86_64__) || defined(__i386__)
    if (!sh->amx && !sh->quant && sh->w_bf16 && sh->fisa == F_BF16) round_rows_for(x, (uint16_t *)buf->xp, sh->B, I);
#endif
    return (Input){x, I};
}

/* buf->h = rmsnorm(x) * w for the sh->B rows, made the projections' input (input_for). */
static Input norm_input_for(const Shape *sh, const Buffers *buf, const float *x, const float *w) {
    if (sh->quant && sh->H % 32 == 0) {
        norm_quantize_for(x, w, buf->h, buf->xq, buf->xs, sh->B, sh->H, sh->eps);
        return (Input){buf->h, sh->H};
    }
    rmsnorm_for(x, w, buf->h, sh->B, sh->H, sh->eps);
    return input_for(sh, buf, buf->h, sh->H);
}

/* buf->act = act(gate) * up of buf->gu, made the down projection's input (input_for). */
static Input act_input_for(const Shape *sh, const Buffers *buf) {
    if (sh->quant) {
        act_quantize_for(buf->gu, buf->act, buf->xq, buf->xs, sh->B, sh->inter, sh->gelu);
        return (Input){buf->act, sh->inter};
    }
    act_mul_for(buf->gu, buf->act, sh->B, sh->inter, sh->gelu);
    return input_for(sh, buf, buf->act, sh->inter);
}

/* u[k] = scale * (A_k . x) for k < R: each block of x is loaded once for all R rows of A. */
static inline __attribute__((always_inline)) void lora_down_r(const void *A, const int bf16, long I, const int R,
                                                              float scale, const float *x, float *u) {
    float sums[LORA_MAX_RANK];
    long i = 0;
#ifdef __AVX512F__
    __m512 acc[16];
    for (int k = 0; k < R; k++) acc[k] = _mm512_setzero_ps();
    for (; i + 16 <= I; i += 16) {
        const __m512 xv = _mm512_loadu_ps(x + i);
        for (int k = 0; k < R; k++) acc[k] = _mm512_fmadd_ps(xv, load16(A, bf16, k * I + i), acc[k]);
    }
    for (int k = 0; k < R; k++) sums[k] = _mm512_reduce_add_ps(acc[k]);
#else
    for (int k = 0; k < R; k++) sums[k] = 0.f;
#endif
    for (; i < I; i++)
        for (int k = 0; k < R; k++) sums[k] += x[i] * load1(A, bf16, k * I + i);
    for (int k = 0; k < R; k++) u[k] = scale * sums[k];
}

static void lora_down(const void *A, int bf16, long I, long r, float scale, const float *x, float *u) {
    switch (r * 2 + !!bf16) { /* the common ranks with their accumulators in registers */
    case 8: lora_down_r(A, 0, I, 4, scale, x, u); return;
    case 9: lora_down_r(A, 1, I, 4, scale, x, u); return;
    case 16: lora_down_r(A, 0, I, 8, scale, x, u); return;
    case 17: lora_down_r(A, 1, I, 8, scale, x, u); return;
    case 32: lora_down_r(A, 0, I, 16, scale, x, u); return;
    case 33: lora_down_r(A, 1, I, 16, scale, x, u); return;
    }
    for (long k = 0; k < r; k++) u[k] = scale * dot(x, (const char *)A + k * I * (bf16 ? 2 : 4), bf16, (int)I);
}

/* y[rows[j]][o] += sum_k u[j][k] Bt[k, o] for the n rows of a unit (u: LORA_MAX_RANK floats a row),
 * the k in order: each block of 16 columns of up to 16 rows of Bt is loaded once for all the rows. */
static void lora_up(const void *Bt, int bf16, long O, long r, const float *u, int n, const int64_t *rows, float *y,
                    long y_stride) {
    long o = 0;
#ifdef __AVX512F__
    for (; o + 16 <= O; o += 16)
        for (long k0 = 0; k0 < r; k0 += 16) {
            const int kn = r - k0 < 16 ? (int)(r - k0) : 16;
            __m512 b[16];
            for (int k = 0; k < kn; k++) b[k] = load16(Bt, bf16, (k0 + k) * O + o);
            for (int j = 0; j < n; j++) {
                float *yj = y + rows[j] * y_stride + o;
                __m512 acc = _mm512_loadu_ps(yj);
                for (int k = 0; k < kn; k++)
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(u[j * LORA_MAX_RANK + k0 + k]), b[k], acc);
                _mm512_storeu_ps(yj, acc);
            }
        }
#endif
    for (int j = 0; j < n; j++)
        for (long oo = o; oo < O; oo++) {
            float *yj = y + rows[j] * y_stride, acc = yj[oo];
            for (long k = 0; k < r; k++) acc = fmaf(u[j * LORA_MAX_RANK + k], load1(Bt, bf16, k * O + oo), acc);
            yj[oo] = acc;
        }
}

/* The adapters' part of projection t: y[b] += scale * sum_k (A_k . x[b]) Bt_k for each row b whose
 * adapter changes t in layer l (S-LoRA's and Punica's split: one product of the base weights for
 * the whole batch, then each row's low-rank term). Work is shared by units of rows of one adapter
 * (buf->lora_plan), so each row of A and Bt is read once for the unit while it sits in L1. A
 * row's sums run in the same order whatever its unit, so its bits are those it gets alone. */
static void lora_for(const Buffers *buf, long l, int t, const float *x, long x_stride, long I, float *y,
                     long y_stride, long O) {
    if (!buf->lora) return;
    const int64_t *plan = buf->lora_plan;
#pragma omp for schedule(dynamic, 1)
    for (long unit = 0; unit < plan[0]; unit++) {
        const int64_t *rows = plan + 1 + unit * (LORA_UNIT + 1) + 1;
        const int n = (int)rows[-1];
        const Lora *a = &buf->lora[rows[0]][l];
        if (!a->A[t]) continue;
        float u[LORA_UNIT * LORA_MAX_RANK];
        for (int j = 0; j < n; j++)
            lora_down(a->A[t], (int)a->bf16, I, a->r, a->scale, x + rows[j] * x_stride, u + j * LORA_MAX_RANK);
        lora_up(a->Bt[t], (int)a->bf16, O, a->r, u, n, rows, y, y_stride);
    }
}

/* y[b, o] (+)= sum_i W[o, i] * in.x[b, i] on whichever unit the step runs on, for W the `count`
 * matrices Ws stacked along their outputs (rows[m] each), written side by side into y; then, with
 * `targets` (which adapter target each W is, of layer `layer`), each row's adapter term. */
static void project_for(const Shape *sh, const Buffers *buf, const void *const *Ws, const long *rows, int count,
                        Input in, float *y, long y_stride, int accumulate, const int *targets, long layer) {
    if (!buf->lora) targets = NULL;
#ifdef HAVE_AMX
    if (sh->amx) {
        const int Bp = (sh->B + 15) / 16 * 16;
        Adapted ad = {buf->lora_blocks, buf->lora_segs, buf->lora_u, layer, count, {0}};
        for (int m = 0; targets && m < count; m++) ad.t[m] = targets[m];
        if (targets) lora_down_tiles_for(&ad, buf->xp, Bp, in.I);
        amx_linear_for((const uint16_t *const *)Ws, rows, count, buf->xp, Bp, y, y_stride, sh->B, in.I, accumulate,
                       targets ? &ad : NULL);
        return;
    }
#endif
#if defined(__x86_64__) || defined(__i386__)
    if (sh->quant && rows16_ready((const QWeight *const *)Ws, count, sh->isa))
        qlinear16_for((const QWeight *const *)Ws, rows, count, sh->isa, buf->xq, buf->xs, y, y_stride, sh->B, in.I,
                      accumulate);
    else if (sh->packed)
        linear_packed_for(Ws, rows, count, sh->w_bf16, sh->fisa, in.x, (const uint16_t *)buf->xp, y, y_stride, sh->B,
                          in.I, accumulate);
    else
#endif
    {
        float *ym = y;
        for (int m = 0; m < count; ym += rows[m], m++)
            if (sh->quant)
                qlinear_for((const QWeight *)Ws[m], sh->isa, buf->xq, buf->xs, ym, y_stride, sh->B, in.I, rows[m],
                            accumulate);
            else
                linear_for(Ws[m], sh->w_bf16, sh->fisa, in.x, (const uint16_t *)buf->xp, ym, y_stride, sh->B, in.I,
                           rows[m], accumulate);
    }
    for (int m = 0; targets && m < count; y += rows[m], m++)
        lora_for(buf, layer, targets[m], in.x, in.I, in.I, y, y_stride, rows[m]);
}

/* One matrix W [O, I], adapter target t of layer `layer` (-1: none). */
static void project1_for(const Shape *sh, const Buffers *buf, const void *W, Input in, float *y, long y_stride, long O,
                         int accumulate, int t, long layer) {
    project_for(sh, buf, &W, &O, 1, in, y, y_stride, accumulate, t < 0 ? NULL : &t, layer);
}

/* Each thread of a parallel region that may use the tile unit starts and ends with these. */
static inline void tiles_begin(const Shape *sh) {
#ifdef HAVE_AMX
    if (sh->amx) tiles_on();
#else
    (void)sh;
#endif
}

static inline void tiles_end(const Shape *sh) {
#ifdef HAVE_AMX
    if (sh->amx) _tile_release();
#else
    (void)sh;
#endif
}

/* Qwen2's q, k and v biases and the RMSNorm of each q and k head (Qwen3, Gemma 3) on the fused
 * q|k|v rows, before the rotation. */
static void qkv_terms_for(const Layer *L, float *qkv, int B, int nh, int nkv, int hd, float eps) {
    if (!L->bq && !L->q_norm) return;
    const long stride = (long)(nh + 2 * nkv) * hd, nq = (long)nh * hd, nk = (long)nkv * hd;
#pragma omp for schedule(static)
    for (int b = 0; b < B; b++) {
        float *row = qkv + b * stride;
        if (L->bq) {
            for (long i = 0; i < nq; i++) row[i] += L->bq[i];
            for (long i = 0; i < nk; i++) row[nq + i] += L->bk[i], row[nq + nk + i] += L->bv[i];
        }
        if (L->q_norm)
            for (int h = 0; h < nh + nkv; h++) rmsnorm(row + (long)h * hd, h < nh ? L->q_norm : L->k_norm, row + (long)h * hd, hd, eps);
    }
}

/* The end of a sublayer whose output went to y (with `norm`) or straight onto the residual x:
 * its output's bias (NULL: none), then with `norm` (Gemma) x += rmsnorm(y) * norm. */
static void sublayer_end_for(const float *bias, const float *norm, float *y, float *x, int B, int H, float eps) {
    if (!bias && !norm) return;
#pragma omp for schedule(static)
    for (int b = 0; b < B; b++) {
        float *out = (norm ? y : x) + (long)b * H;
        if (bias)
            for (int i = 0; i < H; i++) out[i] += bias[i];
        if (norm) {
            rmsnorm(out, norm, out, H, eps);
            for (int i = 0; i < H; i++) x[(long)b * H + i] += out[i];
        }
    }
}

/* y = down(act(gate x) * up x) for the sh->B rows of x (sh->inter wide), not fused: experts are
 * rarely whole tiles of rows. */
static void gated_mlp_for(const Shape *sh, const Buffers *buf, const void *gate, const void *up, const void *down,
                          const float *x, float *y) {
    const long inter = sh->inter;
    const void *gate_up[2] = {gate, up};
    const long gate_up_rows[2] = {inter, inter};
    project_for(sh, buf, gate_up, gate_up_rows, 2, input_for(sh, buf, x, sh->H), buf->gu, 2 * inter, 0, NULL, 0);
    act_mul_for(buf->gu, buf->act, sh->B, inter, sh->gelu);
    project1_for(sh, buf, down, input_for(sh, buf, buf->act, inter), y, sh->H, sh->H, 0, -1, 0);
}

/* The row's router weights of its top_k experts (softmax over all n, then the k largest, lower
 * expert first among equals; renormalized over the k with renorm), -1 for the others. */
static void route_row(float *w, long n, long k, int renorm) {
    float m = -INFINITY, sum = 0.f;
    for (long e = 0; e < n; e++) m = w[e] > m ? w[e] : m;
    for (long e = 0; e < n; e++) sum += w[e] = expf(w[e] - m);
    for (long e = 0; e < n; e++) w[e] /= sum;
    float picked[64], total = 0.f;
    long at[64];
    for (long j = 0; j < k; j++) {
        at[j] = -1;
        for (long e = 0; e < n; e++)
            if (w[e] >= 0.f && (at[j] < 0 || w[e] > w[at[j]])) at[j] = e;
        picked[j] = w[at[j]], total += picked[j];
        w[at[j]] = -2.f; /* taken */
    }
    for (long e = 0; e < n; e++) w[e] = -1.f;
    for (long j = 0; j < k; j++) w[at[j]] = renorm ? picked[j] / total : picked[j];
}

/* x += the mixture of experts of h = buf->h (the layer's normalized rows): the router and the
 * shared expert's gate in fp32 (few outputs: no tiles), then expert by expert the rows routed
 * to it, gathered, through its MLP on whichever unit the step runs on, and added back weighted. */
static void moe_for(const Layer *L, const Buffers *buf, const Shape *sh) {
    const int B = sh->B, H = sh->H;
    const long E = L->n_experts;
    linear_for(L->router, sh->w_bf16, fp32_isa(sh->fisa), buf->h, NULL, buf->route, E, B, H, E, 0);
#pragma omp for schedule(static)
    for (int b = 0; b < B; b++) route_row(buf->route + b * E, E, L->top_k, (int)L->renorm);
    int64_t *start = buf->moe_rows, *rows = start + E + 1; /* expert e's rows: rows[start[e] .. start[e + 1]) */
#pragma omp single
    {
        long n = 0;
        for (long e = 0; e < E; e++) {
            start[e] = n;
            for (int b = 0; b < B; b++)
                if (buf->route[b * E + e] >= 0.f) rows[n++] = b;
        }
        start[E] = n;
    }
    Shape one = *sh;
    one.inter = L->expert_inter, one.packed = 0; /* the experts' weights are read as the model holds them */
    for (long e = 0; e < E; e++) {
        const long n = start[e + 1] - start[e];
        const int64_t *mine = rows + start[e];
        if (n == 0) continue;
#pragma omp for schedule(static)
        for (long i = 0; i < n; i++) memcpy(buf->moe_x + i * H, buf->h + mine[i] * H, H * sizeof(float));
        one.B = (int)n;
        gated_mlp_for(&one, buf, L->experts[3 * e], L->experts[3 * e + 1], L->experts[3 * e + 2], buf->moe_x, buf->moe_y);
#pragma omp for schedule(static)
        for (long i = 0; i < n; i++) {
            const long b = mine[i];
            const float w = buf->route[b * E + e];
            for (int j = 0; j < H; j++) buf->x[b * H + j] += w * buf->moe_y[i * H + j];
        }
    }
    if (!L->shared) return;
    linear_for(L->shared_router, sh->w_bf16, fp32_isa(sh->fisa), buf->h, NULL, buf->route, 1, B, H, 1, 0);
    one.B = B, one.inter = L->shared_inter;
    gated_mlp_for(&one, buf, L->shared[0], L->shared[1], L->shared[2], buf->h, buf->moe_y);
#pragma omp for schedule(static)
    for (int b = 0; b < B; b++) {
        const float gate = 1.f / (1.f + expf(-buf->route[b]));
        for (int j = 0; j < H; j++) buf->x[(long)b * H + j] += gate * buf->moe_y[(long)b * H + j];
    }
}

/* The first half of layer L for rows 0..B-1 of buf->x: norm, q/k/v projections, rotation;
 * keys and values go to each row's position in its pages, the rotated
 * queries stay in buf->qkv. */
static void qkv_for(const Layer *L, const Buffers *buf, const Shape *sh, const int64_t *pos, const float *cos_t,
                    const float *sin_t, const Paging *pg) {
    const int nh = sh->nh, nkv = sh->nkv, hd = sh->hd;
    const long qkv_w = (long)(nh + 2 * nkv) * hd;
    Input in = norm_input_for(sh, buf, buf->x, L->ln1);
    const void *qkv[3] = {L->q, L->k, L->v};
    const long qkv_rows[3] = {(long)nh * hd, (long)nkv * hd, (long)nkv * hd};
    const int targets[3] = {T_Q, T_K, T_V};
    project_for(sh, buf, qkv, qkv_rows, 3, in, buf->qkv, qkv_w, 0, targets, L->index);
    qkv_terms_for(L, buf->qkv, sh->B, nh, nkv, hd, sh->eps);
    rope_store_for(buf->qkv, pos, L->cos ? L->cos : cos_t, L->sin ? L->sin : sin_t, L->K, L->V, sh->kv_bf16, sh->B, nh,
                   nkv, hd, pg);
}

/* The second half once buf->att holds the attention output: output projection and residual,
 * norm, MLP and residual, into buf->x. Gemma's sublayer outputs go to buf->h first, to be normalized. */
static void mlp_for(const Layer *L, const Buffers *buf, const Shape *sh) {
    const int H = sh->H;
    const long inter = sh->inter;
    float *attn_out = L->post_attn ? buf->h : buf->x, *mlp_out = L->post_ff ? buf->h : buf->x;
    Input in = input_for(sh, buf, buf->att, (long)sh->nh * sh->hd);
    project1_for(sh, buf, L->o, in, attn_out, H, H, !L->post_attn, T_O, L->index);
    sublayer_end_for(L->bo, L->post_attn, buf->h, buf->x, sh->B, H, sh->eps);
    if (L->router) {
        rmsnorm_for(buf->x, L->ln2, buf->h, sh->B, H, sh->eps);
        moe_for(L, buf, sh);
        return;
    }
    in = norm_input_for(sh, buf, buf->x, L->ln2);
#ifdef HAVE_AMX
    if (sh->amx) { /* fused gate/up, the adapters' terms added on the tiles */
        const int Bp = (sh->B + 15) / 16 * 16;
        const long down_rows = H;
        Adapted gate_up = {buf->lora_blocks, buf->lora_segs, buf->lora_u, L->index, 2, {T_GATE, T_UP}};
        Adapted down = {buf->lora_blocks, buf->lora_segs, buf->lora_u, L->index, 1, {T_DOWN}};
        if (buf->lora) lora_down_tiles_for(&gate_up, buf->xp, Bp, H);
        amx_gate_up_for(L->gate, L->up, buf->xp, Bp, H, inter, buf->xp_act, sh->gelu, buf->lora ? &gate_up : NULL);
        if (buf->lora) lora_down_tiles_for(&down, buf->xp_act, Bp, inter);
        amx_linear_for((const uint16_t *const *)&L->down, &down_rows, 1, buf->xp_act, Bp, mlp_out, H, sh->B, inter,
                       !L->post_ff, buf->lora ? &down : NULL);
        sublayer_end_for(NULL, L->post_ff, buf->h, buf->x, sh->B, H, sh->eps);
        return;
    }
#endif
    const void *gate_up[2] = {L->gate, L->up};
    const long gate_up_rows[2] = {inter, inter};
    const int targets[2] = {T_GATE, T_UP};
    project_for(sh, buf, gate_up, gate_up_rows, 2, in, buf->gu, 2 * inter, 0, targets, L->index);
    in = act_input_for(sh, buf);
    project1_for(sh, buf, L->down, in, mlp_out, H, H, !L->post_ff, T_DOWN, L->index);
    sublayer_end_for(NULL, L->post_ff, buf->h, buf->x, sh->B, H, sh->eps);
}

/* x holds the new tokens' embeddings; writes their next-token logits. Row b's new key and value
 * go to its position pos[b], and it attends to its positions 0..pos[b]. sh->max_len bounds
 * pos[b] + 1 (scratch size). */
void decode_step_paged(const Layer *layers, const float *final_norm, const void *lm_head, const Buffers *buf,
                       const Shape *sh, const int64_t *pos, const float *cos_t, const float *sin_t,
                       const int64_t *table, long width, long page_size) {
    const Paging pg = {table, width, page_size};
    const long qkv_w = (long)(sh->nh + 2 * sh->nkv) * sh->hd;
    const float scale = attention_scale(sh);
#pragma omp parallel
    {
        tiles_begin(sh);
        for (int l = 0; l < sh->n_layers; l++) {
            const Layer *L = &layers[l];
            qkv_for(L, buf, sh, pos, cos_t, sin_t, &pg);
            attend_for(buf->qkv, qkv_w, L->K, L->V, sh->kv_bf16, sh->amx, buf->att, buf->scores, sh->B, sh->nh,
                       sh->nkv, sh->hd, sh->max_len, scale, pos, &pg, L->window, sh->attn_cap, sh->split_attn);
            mlp_for(L, buf, sh);
        }
        project1_for(sh, buf, lm_head, norm_input_for(sh, buf, buf->x, final_norm), buf->logits, sh->vocab, sh->vocab,
                     0, -1, 0);
        tiles_end(sh);
    }
}

/* Prompt chunks run layer by layer, the caller (fast.py) calling the halves of each layer and
 * the attention between them: chunks_attend for the chunks' rows (a chunk's queries attend to
 * many keys at once, which the one-query loop of attend_for is not made for) and rows_attend
 * for one-token rows riding along. B rows are the chunks' tokens; row b has position pos[b]
 * and its sequence's page table at table[b]. */

/* The first half of layer L (qkv_for) for the chunks' rows, keys and values to their pages. */
void prompt_qkv(const Layer *L, const Buffers *buf, const Shape *sh, const int64_t *pos, const float *cos_t,
                const float *sin_t, const int64_t *table, long width, long page_size) {
    const Paging pg = {table, width, page_size};
#pragma omp parallel
    {
        tiles_begin(sh);
        qkv_for(L, buf, sh, pos, cos_t, sin_t, &pg);
        tiles_end(sh);
    }
}

/* The second half of layer L (mlp_for) once buf->att holds the attention output. */
void prompt_mlp(const Layer *L, const Buffers *buf, const Shape *sh) {
#pragma omp parallel
    {
        tiles_begin(sh);
        mlp_for(L, buf, sh);
        tiles_end(sh);
    }
}

/* Attention of the one-token rows 0..B-1 among them (keys and values stored by prompt_qkv)
 * over their pages, into buf->att; sh->max_len bounds pos[b] + 1 (scratch size). */
void rows_attend(const Layer *L, const Buffers *buf, const Shape *sh, const int64_t *pos, const int64_t *table,
                 long width, long page_size) {
    const Paging pg = {table, width, page_size};
    const long qkv_w = (long)(sh->nh + 2 * sh->nkv) * sh->hd;
#pragma omp parallel
    {
        tiles_begin(sh);
        attend_for(buf->qkv, qkv_w, L->K, L->V, sh->kv_bf16, sh->amx, buf->att, buf->scores, sh->B, sh->nh,
                   sh->nkv, sh->hd, sh->max_len, attention_scale(sh), pos, &pg, L->window, sh->attn_cap,
                   sh->split_attn);
        tiles_end(sh);
    }
}

/* Attention of prompt chunks (keys and values stored by prompt_qkv) into buf->att: chunk c is
 * the rows at[c] .. at[c] + len[c] - 1, at consecutive positions of one sequence whose pages
 * are in the table row of each. Work is shared by (chunk, kv head, block of 16 / group rows);
 * each thread has 16 rows of sh->max_len (>= the last position + 1) floats of buf->scores, so
 * the team is at most `slots` threads. */
void chunks_attend(const Layer *L, const Buffers *buf, const Shape *sh, const int64_t *pos, const int64_t *table,
                   long width, long page_size, const int64_t *at, const int64_t *len, int count, int slots) {
    const Paging pg = {table, width, page_size};
    const int group = sh->nh / sh->nkv, per = 16 / group > 0 ? 16 / group : 1;
    /* values on tiles wherever attend_for weighs them there (a row's bits then match its decode-row
     * twin's); keys on tiles when each 16 positions lie in one page */
    const int value_tiles = sh->amx && sh->kv_bf16 && sh->hd % 32 == 0 && sh->hd <= MAX_HD && group <= 16;
    const int tiles = value_tiles && page_size % 16 == 0;
    const long qkv_w = (long)(sh->nh + 2 * sh->nkv) * sh->hd;
    long units = 0;
    for (int c = 0; c < count; c++) units += (len[c] + per - 1) / per * sh->nkv;
    const int team = omp_get_max_threads() < slots ? omp_get_max_threads() : slots;
#pragma omp parallel num_threads(team)
    {
        tiles_begin(sh);
        float *p = buf->scores + (long)omp_get_thread_num() * 16 * sh->max_len;
#pragma omp for schedule(dynamic, 1)
        for (long u = 0; u < units; u++) {
            long rest = u;
            int c = 0;
            while (rest >= (len[c] + per - 1) / per * sh->nkv) rest -= (len[c] + per - 1) / per * sh->nkv, c++;
            const long block = rest / sh->nkv, r0 = at[c] + block * per;
            const int g = rest % sh->nkv, n_rows = len[c] - block * per < per ? len[c] - block * per : per;
            attend_block(buf->qkv, qkv_w, L->K, L->V, sh->kv_bf16, sh->amx, tiles, value_tiles, buf->att, p, sh->nh,
                         sh->nkv, sh->hd, sh->max_len, attention_scale(sh), pos, &pg, r0, n_rows, g, L->window,
                         sh->attn_cap);
        }
        tiles_end(sh);
    }
}

/* Logits of the n rows rows[0..n) of buf->x (final norm, output layer) into buf->logits. */
void prompt_logits(const float *final_norm, const void *lm_head, const Buffers *buf, const Shape *sh,
                   const int64_t *rows, int n) {
    Shape out = *sh;
    out.B = n;
#pragma omp parallel
    {
        tiles_begin(sh);
#pragma omp for schedule(static)
        for (int i = 0; i < n; i++)
            rmsnorm(buf->x + rows[i] * sh->H, final_norm, buf->h + (long)i * sh->H, sh->H, sh->eps);
        project1_for(&out, buf, lm_head, input_for(&out, buf, buf->h, sh->H), buf->logits, sh->vocab, sh->vocab, 0, -1, 0);
        tiles_end(sh);
    }
}

/* out[i] = the first index of the largest of the n values in row rows[i] of x, as torch.argmax
 * gives it (a NaN counts as the largest): greedy sampling of a step's rows in one call. */
void argmax_rows(const float *x, long n, const int64_t *rows, int count, int64_t *out) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < count; i++) {
        const float *r = x + rows[i] * n;
        long at = 0, best = -1;
        float m = -INFINITY;
        int nan = 0;
#ifdef __AVX512F__
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (; at + 16 <= n; at += 16) {
            const __m512 v = _mm512_loadu_ps(r + at);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
            mv = _mm512_max_ps(mv, v);
        }
        m = _mm512_reduce_max_ps(mv);
#endif
        for (; at < n; at++) {
            nan |= isnan(r[at]);
            m = r[at] > m ? r[at] : m;
        }
        long s = 0;
#ifdef __AVX512F__
        const __m512 mm = _mm512_set1_ps(m);
        for (; !nan && s + 16 <= n; s += 16) {
            const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(r + s), mm, _CMP_EQ_OQ);
            if (hit) {
                best = s + __builtin_ctz(hit);
                break;
            }
        }
#endif
        for (; s < n && best < 0; s++) /* the first NaN, else the first maximum */
            if (nan ? isnan(r[s]) : r[s] == m) best = s;
        out[i] = best < 0 ? 0 : best;
    }
}

/* ------------------------------------------------------------ the sentence encoder's attention
 *
 * Bidirectional attention of the BERT encoder that embeds chunks and messages
 * (parley/pipeline/embed.py), on the tile unit. PyTorch's CPU flash attention took as long as
 * all of a layer's matrix products (384 heads of 256 x 256 x 32 per batch of 32 chunks).
 *   qkv  [B, T, 3, nh, hd] bf16, as the fused projection writes it (row stride 3 nh hd)
 *   out  [B, T, nh, hd] bf16, the input of the output projection
 *   lens [B] the real tokens of each row, at its front; the rest is padding: masked as keys,
 *        and its own outputs are zero (nothing reads them: later layers mask them as keys too,
 *        and the pooling skips them).
 * One (row, head) per task: its keys are packed once as the right operand of Q K^T (32-bit
 * pairs of dims, 16 keys a tile column), its values as that of P V (pairs of keys, 16 dims);
 * then each block of 16 queries: scores on the tiles (fp32 sums of bf16 products), softmax in
 * fp32, probabilities rounded to bf16 for P V on the tiles (as flash attention in bf16 does),
 * divided by the fp32 row sums, on `threads` threads (torch's count: ingest lends one core to its
 * reader). hd % 32 == 0. Returns 0 (nothing done) where it cannot run. */
#ifdef HAVE_AMX
/* e^x for x <= 0 where the result is rounded to bf16 (8 bits): exp16's reduction, the series to
 * r^4 (relative error below 5e-5 for |r| <= 0.35, a fortieth of bf16's half step). */
static inline __m512 exp16_short(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 e = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 24), r, _mm512_set1_ps(1.f / 6));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(e, n);
}

int encoder_attend(const uint16_t *qkv, uint16_t *out, const int32_t *lens, int B, int T, int nh, int hd,
                   float scale, int threads) {
    if (hd % 32 || hd > 256 || T < 1 || !amx_enable()) return 0;
    const long d = (long)nh * hd, row = 3 * d;
    const long Tp = (T + 31) / 32 * 32;
#pragma omp parallel num_threads(threads < 1 ? 1 : threads)
    {
        tiles_on();
        uint32_t *kp = aligned_alloc(64, Tp * hd * 2);  /* [key block][dim pair block][16 pairs][16 keys] */
        uint32_t *vp = aligned_alloc(64, Tp * hd * 2);  /* [key pair block][dim block][16 key pairs][16 dims] */
        float *s = aligned_alloc(64, 16 * Tp * 4);      /* a query block's scores */
        uint16_t *p = aligned_alloc(64, 16 * Tp * 2);   /* its probabilities, bf16 */
        uint16_t *q = aligned_alloc(64, 16 * hd * 2);   /* its queries (zero past the real ones) */
        float *o = aligned_alloc(64, 16 * 32 * 4);      /* 32 dims of its outputs */
        float sum[16];
#pragma omp for schedule(dynamic)
        for (long task = 0; task < (long)B * nh; task++) {
            const long b = task / nh, h = task % nh;
            const int n = lens[b] < 0 ? 0 : lens[b] > T ? T : lens[b];
            const int nk = (n + 31) / 32 * 32;
            const uint16_t *Q = qkv + b * T * row + h * hd, *K = Q + d, *V = Q + 2 * d;
            uint16_t *O = out + b * T * d + h * hd;
            for (int i = n; i < T; i++) memset(O + i * d, 0, hd * 2);
            if (!n) continue;
            const int pairs = hd / 2;
            for (int j0 = 0; j0 < nk; j0 += 16) /* 16 keys' pairs k0.. k0+15, transposed: kp[j0/16][k0/16][k][j] */
                for (int k0 = 0; k0 < pairs; k0 += 16) {
                    __m512i rows[16], cols[16];
                    for (int i = 0; i < 16; i++)
                        rows[i] = j0 + i < n ? _mm512_loadu_si512(K + (j0 + i) * row + 2 * k0) : _mm512_setzero_si512();
                    transpose16(rows, cols);
                    uint32_t *dst = kp + ((long)(j0 / 16) * (pairs / 16) + k0 / 16) * 256;
                    for (int k = 0; k < 16; k++) _mm512_store_si512(dst + k * 16, cols[k]);
                }
            for (int j = 0; j < nk; j += 2) /* keys j, j + 1 of dims e0.. e0+15 as pairs: vp[j/32][e0/16][j%32/2][e] */
                for (int e0 = 0; e0 < hd; e0 += 16) {
                    const __m512i lo = j < n ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(V + j * row + e0)))
                                             : _mm512_setzero_si512();
                    const __m512i hi = j + 1 < n ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(V + (j + 1) * row + e0)))
                                                 : _mm512_setzero_si512();
                    _mm512_store_si512(vp + ((long)(j / 32) * (hd / 16) + e0 / 16) * 256 + (j % 32 / 2) * 16,
                                       _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
                }
            for (int q0 = 0; q0 < n; q0 += 16) {
                const int m = n - q0 < 16 ? n - q0 : 16;
                memset(q, 0, 16 * hd * 2);
                for (int r = 0; r < m; r++) memcpy(q + r * hd, Q + (q0 + r) * row, hd * 2);
                for (int j0 = 0; j0 < nk; j0 += 16) {
                    _tile_zero(0);
                    for (int k0 = 0; k0 < hd; k0 += 32) {
                        _tile_loadd(4, q + k0, hd * 2);
                        _tile_loadd(5, kp + ((long)(j0 / 16) * (pairs / 16) + k0 / 32) * 256, 64);
                        _tile_dpbf16ps(0, 4, 5);
                    }
                    _tile_stored(0, s + j0, Tp * 4);
                }
                for (int r = 0; r < 16; r++) { /* softmax over the n real keys; zeros up to nk */
                    float *sr = s + r * Tp;
                    uint16_t *pr = p + r * Tp;
                    __m512 mx = _mm512_set1_ps(-INFINITY);
                    for (int j = 0; j < n; j += 16) {
                        const __mmask16 in = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
                        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), in, sr + j));
                    }
                    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * scale), sc = _mm512_set1_ps(scale);
                    __m512 acc = _mm512_setzero_ps();
                    for (int j = 0; j < nk; j += 16) {
                        const __mmask16 in = j >= n ? 0 : n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
                        const __m512 e = _mm512_maskz_mov_ps(in, exp16_short(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), sc, shift)));
                        acc = _mm512_add_ps(acc, e);
                        _mm256_storeu_si256((__m256i *)(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
                    }
                    sum[r] = _mm512_reduce_add_ps(acc);
                }
                for (int e0 = 0; e0 < hd; e0 += 32) {
                    _tile_zero(0);
                    _tile_zero(1);
                    for (int j0 = 0; j0 < nk; j0 += 32) {
                        const uint32_t *vb = vp + ((long)(j0 / 32) * (hd / 16) + e0 / 16) * 256;
                        _tile_loadd(4, p + j0, Tp * 2);
                        _tile_loadd(5, vb, 64);
                        _tile_loadd(6, vb + 256, 64);
                        _tile_dpbf16ps(0, 4, 5);
                        _tile_dpbf16ps(1, 4, 6);
                    }
                    _tile_stored(0, o, 32 * 4);
                    _tile_stored(1, o + 16, 32 * 4);
                    for (int r = 0; r < m; r++) {
                        const __m512 inv = _mm512_set1_ps(1.f / sum[r]);
                        uint16_t *dst = O + (q0 + r) * d + e0;
                        _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + r * 32), inv)));
                        _mm256_storeu_si256((__m256i *)(dst + 16), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + r * 32 + 16), inv)));
                    }
                }
            }
        }
        free(kp); free(vp); free(s); free(p); free(q); free(o);
        _tile_release();
    }
    return 1;
}
#else
int encoder_attend(const uint16_t *qkv, uint16_t *out, const int32_t *lens, int B, int T, int nh, int hd,
                   float scale, int threads) {
    (void)qkv; (void)out; (void)lens; (void)B; (void)T; (void)nh; (void)hd; (void)scale; (void)threads;
    return 0;
}
#endif
