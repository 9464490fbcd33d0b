/* Paged extend attention on a CPU, bf16: each sequence's new tokens attend causally to
 * themselves and to its cached prefix (a prompt, a chunk of one, the rest after a prefix hit).
 * The torch op (kernels/paged_attention.py) gathers the context and runs matmuls and a softmax
 * over the whole score matrix; at a few thousand tokens that matrix leaves the caches and the
 * softmax alone costs as much as both matmuls. Here scores never leave registers (the flash
 * attention way): each tile of query rows walks the keys 32 at a time, keeping a running max
 * and sum per row, and rescales what it has summed whenever the max grows.
 *
 * Per sequence and KV head, the keys and values it may read are first packed from their blocks
 * (layout: paged_decode.c) into the operands of VDPBF16PS, 32 keys a chunk:
 *   keys   [head_dim / 2][32][2]: one vector = 16 keys' dims d, d + 1, against a query's
 *          dims d, d + 1 broadcast;
 *   values [16][head_dim][2]:    one vector = 16 dims of keys 2j, 2j + 1, against a row's
 *          probabilities of those two keys broadcast.
 * A tile is 8 query rows of one KV head (its query heads side by side, token after token), so
 * each packed vector is read once for 8 rows. Scores, maxima and sums are fp32; probabilities
 * are rounded to bf16 for the values' dot products (as the torch op rounds them), the output
 * once on store. A sliding-window layer's row sees only its last `window` positions (0: all),
 * and its tile starts at the first chunk its earliest row sees; Gemma 2's scores are
 * soft-capped before the softmax (`softcap`; 0: not).
 * Tiles are shared out over OpenMP threads, the longest (latest tokens) first.
 * Where this CPU has no AVX-512 BF16 or head_dim is not a multiple of 32, the function
 * refuses and the torch op serves. */
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define KEYS 32 /* keys a chunk: two vectors of scores per row */
#define ROWS 8  /* query rows a tile: 8 x 2 score vectors, 2 key vectors, a broadcast */
#define MAX_HEAD_DIM 256
#define MASKED -1e30f /* a score no row may see: finite, so -ffast-math cannot misfold it */

/* e^x for x <= 0: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^5 (relative
 * error under 3e-6, far below the bf16 rounding the probabilities get), times 2^n. Below -100
 * the result is ~0 (callers zero what they mask). */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* ln2, split in two */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 120);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* cap * tanh(x / cap), from e^-2|y| (exp_ps wants x <= 0): tanh|y| = (1 - e) / (1 + e). */
static inline __m512 soft_cap_ps(__m512 x, float cap) {
    const __m512 y = _mm512_div_ps(x, _mm512_set1_ps(cap));
    const __m512 e = exp_ps(_mm512_mul_ps(_mm512_abs_ps(y), _mm512_set1_ps(-2.f)));
    const __m512 one = _mm512_set1_ps(1.f);
    const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    const __mmask16 negative = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mul_ps(_mm512_mask_sub_ps(t, negative, _mm512_setzero_ps(), t),
                         _mm512_set1_ps(cap));
}

/* Where one sequence's rows and packed operands are. */
typedef struct {
    const uint16_t *q;   /* its first new token's query, [n_new][q_heads][head_dim] */
    uint16_t *out;       /* likewise */
    const int64_t *table;
    int64_t n_new, ctx;  /* ctx: cached + new, the new ones already written */
    int64_t chunks;      /* ceil(ctx / KEYS) */
    int64_t first_chunk; /* the first its earliest row sees (a window may skip the rest) */
    uint32_t *keys;      /* packed, [kv_heads][chunks][head_dim / 2][KEYS] pairs */
    uint32_t *values;    /* packed, [kv_heads][chunks][KEYS / 2][head_dim] pairs */
    int64_t tiles;       /* per KV head: ceil(n_new * group / ROWS) */
} Seq;

typedef struct {
    const uint16_t *k_cache, *v_cache;
    int64_t block_stride, block_size, q_heads, kv_heads, head_dim;
    float scale;
    int64_t window; /* 0: every position */
    float softcap;  /* 0: none */
} Layout;

/* Where chunk c of KV head h starts in a sequence's packed keys or values (the same size). */
static inline int64_t chunk_at(const Seq *s, int64_t h, int64_t c, int64_t head_dim) {
    return (h * s->chunks + c) * head_dim / 2 * KEYS;
}

/* 16 bf16 from row + d, each in the low half of a 32-bit lane; zeros for no row. */
static inline __m512i widen(const uint16_t *row, int64_t d) {
    return row ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + d)))
               : _mm512_setzero_si512();
}

/* Keys and values c * KEYS .. + KEYS of KV head h, zeros past the context. */
static void pack_chunk(const Layout *L, const Seq *s, int64_t h, int64_t c) {
    const int64_t pairs = L->head_dim / 2, row_stride = L->kv_heads * L->head_dim;
    uint32_t *kp = s->keys + chunk_at(s, h, c, L->head_dim);
    uint32_t *vp = s->values + chunk_at(s, h, c, L->head_dim);
    const uint16_t *k[KEYS], *v[KEYS];
    for (int64_t i = 0; i < KEYS; i++) { /* past the context: no row, and no table entry */
        const int64_t t = c * KEYS + i;
        const int64_t at = t < s->ctx ? s->table[t / L->block_size] * L->block_stride
                                            + (t % L->block_size) * row_stride + h * L->head_dim
                                      : -1;
        k[i] = at < 0 ? NULL : L->k_cache + at;
        v[i] = at < 0 ? NULL : L->v_cache + at;
    }
    for (int64_t i = 0; i < KEYS; i++)
        for (int64_t p = 0; p < pairs; p++)
            kp[p * KEYS + i] = k[i] ? ((const uint32_t *)k[i])[p] : 0;
    for (int64_t j = 0; j < KEYS / 2; j++) /* lane d: value d of key 2j, then of key 2j + 1 */
        for (int64_t d = 0; d < L->head_dim; d += 16) {
            const __m512i a = widen(v[2 * j], d), b = widen(v[2 * j + 1], d);
            _mm512_storeu_si512(vp + j * L->head_dim + d,
                                _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
        }
}

/* ROWS query rows of KV head h over every key the last of them may see. Row r is query head
 * h * group + (first + r) % group of new token (first + r) / group; rows past the sequence's
 * repeat its last row and are not stored. */
ALWAYS_INLINE void tile(const Layout *L, const Seq *s, int64_t h, int64_t first,
                        const int64_t head_dim) {
    const int64_t group = L->q_heads / L->kv_heads, pairs = head_dim / 2;
    const int64_t last_row = s->n_new * group - 1, cached = s->ctx - s->n_new;
    uint32_t q[ROWS][MAX_HEAD_DIM / 2]; /* the rows side by side: one base register */
    int64_t pos[ROWS];
    for (int r = 0; r < ROWS; r++) {
        const int64_t row = first + r < last_row ? first + r : last_row;
        const int64_t token = row / group, head = h * group + row % group;
        memcpy(q[r], s->q + (token * L->q_heads + head) * head_dim, head_dim * sizeof(uint16_t));
        pos[r] = cached + token;
    }
    float o[ROWS][MAX_HEAD_DIM] __attribute__((aligned(64)));
    float m[16];
    __m512 l[ROWS]; /* each row's sum, lane by lane: added up once, at the end */
    uint32_t prob[ROWS][KEYS / 2]; /* bf16 probabilities, two keys a lane */
    for (int r = 0; r < ROWS; r++) {
        m[r] = MASKED, l[r] = _mm512_setzero_ps();
        for (int64_t d = 0; d < head_dim; d++) o[r][d] = 0.f;
    }
    const __m512 scale = _mm512_set1_ps(L->scale);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i lane_hi = _mm512_add_epi32(lane, _mm512_set1_epi32(16));
    int64_t oldest[ROWS]; /* the first position each row sees */
    for (int r = 0; r < ROWS; r++)
        oldest[r] = L->window > 0 && pos[r] >= L->window ? pos[r] - L->window + 1 : 0;
    for (int64_t c = oldest[0] / KEYS; c * KEYS <= pos[ROWS - 1]; c++) {
        const uint32_t *kp = s->keys + chunk_at(s, h, c, head_dim);
        const uint32_t *vp = s->values + chunk_at(s, h, c, head_dim);
        __m512 sc[ROWS][2];
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; r++) sc[r][0] = sc[r][1] = _mm512_setzero_ps();
        for (int64_t p = 0; p < pairs; p++) {
            const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + p * KEYS);
            const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + p * KEYS + 16);
#pragma GCC unroll 8
            for (int r = 0; r < ROWS; r++) {
                const __m512bh a = (__m512bh)_mm512_set1_epi32((int)q[r][p]);
                sc[r][0] = _mm512_dpbf16_ps(sc[r][0], a, k0);
                sc[r][1] = _mm512_dpbf16_ps(sc[r][1], a, k1);
            }
        }
        /* each row's new max first, then every row's rescale factor in one exp */
        __mmask16 seen[ROWS][2];
        float grown[16];
        for (int r = 0; r < ROWS; r++) {
            const __m512i past = _mm512_set1_epi32((int)(pos[r] - c * KEYS)); /* last seen */
            const __m512i from = _mm512_set1_epi32((int)(oldest[r] - c * KEYS)); /* first */
            seen[r][0] = _mm512_cmple_epi32_mask(lane, past) & _mm512_cmpge_epi32_mask(lane, from);
            seen[r][1] =
                _mm512_cmple_epi32_mask(lane_hi, past) & _mm512_cmpge_epi32_mask(lane_hi, from);
            for (int j = 0; j < 2; j++) {
                sc[r][j] = _mm512_mul_ps(sc[r][j], scale);
                if (L->softcap > 0.f) sc[r][j] = soft_cap_ps(sc[r][j], L->softcap);
                sc[r][j] = _mm512_mask_mov_ps(_mm512_set1_ps(MASKED), seen[r][j], sc[r][j]);
            }
            const float top = _mm512_reduce_max_ps(_mm512_max_ps(sc[r][0], sc[r][1]));
            grown[r] = top > m[r] ? top : m[r];
        }
        for (int r = ROWS; r < 16; r++) grown[r] = m[r] = 0.f;
        float alpha[16];
        _mm512_storeu_ps(alpha, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(m), _mm512_loadu_ps(grown))));
        for (int r = 0; r < ROWS; r++) {
            const __m512 top = _mm512_set1_ps(grown[r]);
            const __m512 p0 = _mm512_maskz_mov_ps(seen[r][0], exp_ps(_mm512_sub_ps(sc[r][0], top)));
            const __m512 p1 = _mm512_maskz_mov_ps(seen[r][1], exp_ps(_mm512_sub_ps(sc[r][1], top)));
            l[r] = _mm512_fmadd_ps(l[r], _mm512_set1_ps(alpha[r]), _mm512_add_ps(p0, p1));
            m[r] = grown[r];
            _mm512_storeu_si512(prob[r], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        }
        /* o = alpha o + p V, 32 dims at a time: 16 sums in flight hide VDPBF16PS's latency */
        for (int64_t d = 0; d < head_dim; d += 32) {
            __m512 acc[ROWS][2];
#pragma GCC unroll 8
            for (int r = 0; r < ROWS; r++) {
                const __m512 a = _mm512_set1_ps(alpha[r]);
                for (int i = 0; i < 2; i++)
                    acc[r][i] = _mm512_mul_ps(_mm512_load_ps(o[r] + d + 16 * i), a);
            }
            for (int j = 0; j < KEYS / 2; j++) {
                const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vp + j * head_dim + d);
                const __m512bh v1 = (__m512bh)_mm512_loadu_si512(vp + j * head_dim + d + 16);
#pragma GCC unroll 8
                for (int r = 0; r < ROWS; r++) {
                    const __m512bh p = (__m512bh)_mm512_set1_epi32((int)prob[r][j]);
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], p, v0);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], p, v1);
                }
            }
#pragma GCC unroll 8
            for (int r = 0; r < ROWS; r++)
                for (int i = 0; i < 2; i++) _mm512_store_ps(o[r] + d + 16 * i, acc[r][i]);
        }
    }
    for (int r = 0; r < ROWS && first + r <= last_row; r++) {
        const int64_t row = first + r, token = row / group, head = h * group + row % group;
        uint16_t *out = s->out + (token * L->q_heads + head) * head_dim;
        const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(l[r]));
        for (int64_t d = 0; d < head_dim; d += 16) {
            const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(o[r] + d), inv));
            _mm256_storeu_si256((__m256i *)(out + d), (__m256i)y);
        }
    }
}

/* The common head sizes get a constant head_dim, so the compiler unrolls the dims. */
static void any_tile(const Layout *L, const Seq *s, int64_t h, int64_t first) {
    switch (L->head_dim) {
    case 64: tile(L, s, h, first, 64); break;
    case 128: tile(L, s, h, first, 128); break;
    default: tile(L, s, h, first, L->head_dim); break;
    }
}

int paged_extend_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                      int64_t block_stride, const int64_t *tables, int64_t table_stride,
                      const int64_t *cu_seqlens, const int64_t *ctx_lens, int64_t num_seqs,
                      int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                      float scale, int64_t window, float softcap, uint16_t *out) {
    if (head_dim % 32 || head_dim > MAX_HEAD_DIM || q_heads % kv_heads) return -1;
    const Layout L = {k_cache, v_cache, block_stride, block_size, q_heads,
                      kv_heads, head_dim, scale, window, softcap};
    Seq *seqs = malloc((size_t)num_seqs * sizeof(Seq));
    if (seqs == NULL) return -1;
    int64_t chunks = 0;
    for (int64_t i = 0; i < num_seqs; i++) {
        Seq *s = &seqs[i];
        s->q = q + cu_seqlens[i] * q_heads * head_dim;
        s->out = out + cu_seqlens[i] * q_heads * head_dim;
        s->table = tables + i * table_stride;
        s->n_new = cu_seqlens[i + 1] - cu_seqlens[i];
        s->ctx = ctx_lens[i];
        s->chunks = (s->ctx + KEYS - 1) / KEYS;
        const int64_t cached = s->ctx - s->n_new;
        s->first_chunk = window > 0 && cached >= window ? (cached - window + 1) / KEYS : 0;
        s->tiles = (s->n_new * (q_heads / kv_heads) + ROWS - 1) / ROWS;
        chunks += s->chunks;
    }
    const int64_t chunk_pairs = kv_heads * head_dim / 2 * KEYS; /* all KV heads' chunk */
    uint32_t *packed = malloc((size_t)(2 * chunks * chunk_pairs) * sizeof(uint32_t));
    if (packed == NULL) {
        free(seqs);
        return -1;
    }
    for (int64_t i = 0, at = 0; i < num_seqs; at += seqs[i].chunks, i++) {
        seqs[i].keys = packed + at * chunk_pairs;
        seqs[i].values = packed + (chunks + at) * chunk_pairs;
    }
#pragma omp parallel
    {
        for (int64_t i = 0; i < num_seqs; i++) {
#pragma omp for schedule(static) nowait
            for (int64_t u = 0; u < kv_heads * seqs[i].chunks; u++)
                if (u % seqs[i].chunks >= seqs[i].first_chunk)
                    pack_chunk(&L, &seqs[i], u / seqs[i].chunks, u % seqs[i].chunks);
        }
#pragma omp barrier
        for (int64_t i = 0; i < num_seqs; i++) {
            const int64_t tiles = seqs[i].tiles;
#pragma omp for schedule(dynamic) nowait
            for (int64_t u = kv_heads * tiles - 1; u >= 0; u--) /* the later tokens first */
                any_tile(&L, &seqs[i], u % kv_heads, u / kv_heads * ROWS);
        }
    }
    free(packed);
    free(seqs);
    return 0;
}

#else /* the torch op serves */
int paged_extend_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                      int64_t block_stride, const int64_t *tables, int64_t table_stride,
                      const int64_t *cu_seqlens, const int64_t *ctx_lens, int64_t num_seqs,
                      int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                      float scale, int64_t window, float softcap, uint16_t *out) {
    (void)q, (void)k_cache, (void)v_cache, (void)block_stride, (void)tables, (void)table_stride;
    (void)cu_seqlens, (void)ctx_lens, (void)num_seqs, (void)q_heads, (void)kv_heads;
    (void)head_dim, (void)block_size, (void)scale, (void)window, (void)softcap, (void)out;
    return -1;
}
#endif
