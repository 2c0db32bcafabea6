/* One decode step of a Llama-style model on the CPU (parley/engine/fast.py calls it via ctypes).
 *
 * Decoding one token at a time is bound by memory bandwidth: every weight is read once
 * per step and used for only a few multiply-adds. Stock PyTorch reaches a fraction of the
 * bandwidth there (bf16 matrix-vector products especially) and pays microseconds of
 * dispatch for each of the ~1,000 small ops of a 30-layer step. Here the whole step is one
 * call and one OpenMP parallel region: weights are read as bf16 (or fp32) straight into
 * fp32 registers, activations stay fp32, and the threads meet at a barrier between ops.
 * Functions named *_for are work-shared loops: they must run inside the parallel region.
 *
 * Layouts (all row-major, contiguous unless a stride is given):
 *   x, y        [B, n] activations, fp32
 *   W           [O, I] weights (nn.Linear layout), bf16 bits (uint16) or fp32
 *   K, V        [B, n_kv, max_len, hd] cache, fp32
 *   valid       [B, max_len] bool: slot holds a real token
 * or, for decode_step_paged (the paged cache of engine/cache.py):
 *   K, V        [pages, n_kv, page_size, hd] page pools, fp32
 *   table       [B, width] int64: row b's position p lives in page table[b, p / page_size]
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
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
#endif

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

static inline __attribute__((always_inline)) void linear_impl(const void *W, const int w_bf16, const float *x,
                                                              float *y, long y_stride, int B, long I, long O,
                                                              int accumulate) {
#pragma omp for schedule(static)
    for (long o = 0; o < O; o += 4) {
        for (int b0 = 0; b0 < B; b0 += 4) {
            int nb = B - b0 < 4 ? B - b0 : 4;
            const float *xb = x + b0 * I;
            float *yb = y + b0 * y_stride;
            if (o + 4 <= O) {
                DOT_BLOCKS(4, o)
            } else {
                for (long tail = o; tail < O; tail++) DOT_BLOCKS(1, tail)
            }
        }
    }
}

/* y[b, o] (+)= sum_i W[o, i] * x[b, i]. W is bf16 bits when w_bf16, else fp32; rows of y are
 * y_stride apart, so q, k and v (or gate and up) can be written side by side into one
 * buffer. Weight rows are read from memory once, in blocks of 4, and applied to every
 * row of x while they sit in L1. */
static void linear_for(const void *W, int w_bf16, const float *x, float *y, long y_stride, int B, long I, long O,
                       int accumulate) {
    if (w_bf16)
        linear_impl(W, 1, x, y, y_stride, B, I, O, accumulate);
    else
        linear_impl(W, 0, x, y, y_stride, B, I, O, accumulate);
}

/* y[b] = x[b] / rms(x[b]) * w */
static void rmsnorm(const float *x, const float *w, float *y, int B, int H, float eps) {
    for (int b = 0; b < B; b++) {
        const float *xb = x + (long)b * H;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < H; i++) ss += xb[i] * xb[i];
        float r = 1.f / sqrtf(ss / H + eps);
        for (int i = 0; i < H; i++) y[(long)b * H + i] = xb[i] * r * w[i];
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

/* Where the cache keeps row b's key (or value) for kv head g at slot s: in the row's own
 * contiguous buffer, or (with a page table) in the page holding its position s. */
typedef struct {
    const int64_t *table; /* NULL: contiguous cache */
    long width, page_size;
} Paging;

static inline long kv_at(const Paging *pg, int b, int g, long s, int nkv, int hd, long max_len) {
    if (!pg->table) return (((long)b * nkv + g) * max_len + s) * hd;
    long page = pg->table[(long)b * pg->width + s / pg->page_size];
    return ((page * nkv + g) * pg->page_size + s % pg->page_size) * hd;
}

/* qkv: [B, (nh + 2 nkv) * hd], the fused q|k|v projection of one new token per row.
 * Rotate q and k at each row's position, then store k and v in cache slot `slot` (paged:
 * at the row's position). */
static void rope_store(float *qkv, const int64_t *pos, const float *cos_t, const float *sin_t, float *K, float *V,
                int B, int nh, int nkv, int hd, long max_len, long slot, const Paging *pg) {
    long stride = (long)(nh + 2 * nkv) * hd;
    for (int b = 0; b < B; b++) {
        float *row = qkv + b * stride;
        const float *c = cos_t + pos[b] * hd, *s = sin_t + pos[b] * hd;
        for (int h = 0; h < nh + nkv; h++) rotate(row + (long)h * hd, c, s, hd);
        for (int h = 0; h < nkv; h++) {
            long dst = kv_at(pg, b, h, pg->table ? pos[b] : slot, nkv, hd, max_len);
            memcpy(K + dst, row + (long)(nh + h) * hd, hd * sizeof(float));
            memcpy(V + dst, row + (long)(nh + nkv + h) * hd, hd * sizeof(float));
        }
    }
}

/* One query per row against the first S slots of the cache (paged: the row's first
 * pos[b] + 1 positions, all real); q is read from qkv rows (stride q_stride), out is
 * [B, nh * hd]. scratch holds B * nh * max_len floats. */
static void attend_for(const float *qkv, long q_stride, const float *K, const float *V, const uint8_t *valid,
                       float *out, float *scratch, int B, int nh, int nkv, int hd, long max_len, long S, float scale,
                       const int64_t *pos, const Paging *pg) {
    int group = nh / nkv;
#pragma omp for schedule(static)
    for (long bh = 0; bh < (long)B * nh; bh++) {
        int b = bh / nh, h = bh % nh, g = h / group;
        const float *q = qkv + b * q_stride + (long)h * hd;
        const uint8_t *ok = pg->table ? NULL : valid + (long)b * max_len;
        long n = pg->table ? pos[b] + 1 : S;
        float *p = scratch + bh * max_len, m = -INFINITY, sum = 0.f;
        for (long s = 0; s < n; s++) {
            if (ok && !ok[s]) { p[s] = -INFINITY; continue; }
            const float *k = K + kv_at(pg, b, g, s, nkv, hd, max_len);
            float d = 0.f;
#pragma omp simd reduction(+ : d)
            for (int i = 0; i < hd; i++) d += q[i] * k[i];
            p[s] = d * scale;
            if (p[s] > m) m = p[s];
        }
        for (long s = 0; s < n; s++) { p[s] = !ok || ok[s] ? expf(p[s] - m) : 0.f; sum += p[s]; }
        float *o = out + (long)b * nh * hd + (long)h * hd;
        for (int i = 0; i < hd; i++) o[i] = 0.f;
        for (long s = 0; s < n; s++) {
            if (p[s] == 0.f) continue;
            const float *v = V + kv_at(pg, b, g, s, nkv, hd, max_len);
            float ps = p[s] / sum;
            for (int i = 0; i < hd; i++) o[i] += ps * v[i];
        }
    }
}

/* gu: [B, 2I] = gate | up; h[b] = silu(gate) * up */
static void silu_mul_for(const float *gu, float *h, int B, long I) {
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (long i = 0; i < I; i++) {
            float g = gu[b * 2 * I + i], u = gu[b * 2 * I + I + i];
            h[b * I + i] = g / (1.f + expf(-g)) * u;
        }
}

/* Pointers to one layer's weights (nn.Linear layout) and its slice of the KV cache. */
typedef struct {
    const void *q, *k, *v, *o, *gate, *up, *down;
    const float *ln1, *ln2;
    float *K, *V;
} Layer;

/* Scratch activations, fp32: x, h [B, H]; qkv [B, (nh + 2 nkv) hd]; att [B, nh hd];
 * gu [B, 2 inter]; act [B, inter]; scores [B, nh, max_len]; logits [B, vocab]. */
typedef struct {
    float *x, *h, *qkv, *att, *gu, *act, *scores, *logits;
} Buffers;

typedef struct {
    int B, H, nh, nkv, hd, n_layers, w_bf16;
    long inter, vocab, max_len, slot;
    float eps;
} Shape;

static void step(const Layer *layers, const float *final_norm, const void *lm_head, const Buffers *buf,
                 const Shape *sh, const int64_t *pos, const float *cos_t, const float *sin_t,
                 const uint8_t *valid, const Paging *pg) {
    const int B = sh->B, H = sh->H, nh = sh->nh, nkv = sh->nkv, hd = sh->hd, wb = sh->w_bf16;
    const long qkv_w = (long)(nh + 2 * nkv) * hd, inter = sh->inter;
    const float scale = 1.f / sqrtf((float)hd);
#pragma omp parallel
    {
        for (int l = 0; l < sh->n_layers; l++) {
            const Layer *L = &layers[l];
#pragma omp single
            rmsnorm(buf->x, L->ln1, buf->h, B, H, sh->eps);
            linear_for(L->q, wb, buf->h, buf->qkv, qkv_w, B, H, (long)nh * hd, 0);
            linear_for(L->k, wb, buf->h, buf->qkv + nh * hd, qkv_w, B, H, (long)nkv * hd, 0);
            linear_for(L->v, wb, buf->h, buf->qkv + (nh + nkv) * hd, qkv_w, B, H, (long)nkv * hd, 0);
#pragma omp single
            rope_store(buf->qkv, pos, cos_t, sin_t, L->K, L->V, B, nh, nkv, hd, sh->max_len, sh->slot, pg);
            attend_for(buf->qkv, qkv_w, L->K, L->V, valid, buf->att, buf->scores, B, nh, nkv, hd, sh->max_len,
                       sh->slot + 1, scale, pos, pg);
            linear_for(L->o, wb, buf->att, buf->x, H, B, (long)nh * hd, H, 1);
#pragma omp single
            rmsnorm(buf->x, L->ln2, buf->h, B, H, sh->eps);
            linear_for(L->gate, wb, buf->h, buf->gu, 2 * inter, B, H, inter, 0);
            linear_for(L->up, wb, buf->h, buf->gu + inter, 2 * inter, B, H, inter, 0);
            silu_mul_for(buf->gu, buf->act, B, inter);
            linear_for(L->down, wb, buf->act, buf->x, H, B, inter, H, 1);
        }
#pragma omp single
        rmsnorm(buf->x, final_norm, buf->h, B, H, sh->eps);
        linear_for(lm_head, wb, buf->h, buf->logits, sh->vocab, B, H, sh->vocab, 0);
    }
}

/* x holds the new tokens' embeddings; writes their next-token logits. The new keys and
 * values go to cache slot `slot`; rows attend to the slots marked valid up to it. */
void decode_step(const Layer *layers, const float *final_norm, const void *lm_head, const Buffers *buf,
                 const Shape *sh, const int64_t *pos, const float *cos_t, const float *sin_t,
                 const uint8_t *valid) {
    const Paging contiguous = {NULL, 0, 0};
    step(layers, final_norm, lm_head, buf, sh, pos, cos_t, sin_t, valid, &contiguous);
}

/* The same step over a paged cache: row b's new key and value go to its position pos[b],
 * and it attends to its positions 0..pos[b]. sh->max_len bounds pos[b] + 1 (scratch size). */
void decode_step_paged(const Layer *layers, const float *final_norm, const void *lm_head, const Buffers *buf,
                       const Shape *sh, const int64_t *pos, const float *cos_t, const float *sin_t,
                       const int64_t *table, long width, long page_size) {
    const Paging paged = {table, width, page_size};
    step(layers, final_norm, lm_head, buf, sh, pos, cos_t, sin_t, NULL, &paged);
}
