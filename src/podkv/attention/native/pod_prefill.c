/* A one-shot PoD prefill of one layer (batch 1, float32) in one flash-style pass per KV head (issue 19).
 *
 * Query row i (cache index i) reads, in one softmax, the sinks j < ns and the window i - nr < j <= i with its own
 * query and keys, and the distant keys ns <= j <= i - nr with the distant query (the anchor's in mode scores, its
 * own in mode keys) and the anchor's keys; the values are its own throughout. Per KV head, one of three kinds:
 *   0  own anchor: every key is scored with its own query and keys (causal attention, exactly);
 *   1  shared: as above;
 *   2  window only: the sinks and the window, no distant key.
 *
 * Why C: as PyTorch this is two fused calls and a merge per head run (a band pass whose masked third is scored
 * and thrown away, a distant pass shifted by nr, a log-sum-exp merge and copies): 32 ms for a shared layer of
 * SmolLM2 at 1K against 23 for dense's one causal call (benchmarks/shipped/prefill_layer_1024.json). Here each
 * (row block, key tile) pair is scored once, with the query its keys need, and only tiles some row sees are
 * visited. Scores are in base 2 (queries scaled by scale * log2 e as they are packed); each row keeps a running
 * peak and sum (online softmax), so no score matrix is ever stored. Products run on 4-row x 64-column register
 * tiles of GCC vector types (any x86-64 or Arm target; -march=native picks the width). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
#define BR 64 /* query rows per task (per query head) */
#define BC 64 /* keys per tile */
#define MAXG 16
#define FIELDS 13 /* int64 per KV head of podkv_pod_prefill (native.PREFILL_FIELDS) */
#define NEG (-1e30f) /* 'no score yet': finite, since the file is built with -ffast-math (no infinities) */

static inline v16 ld(const float *p) { v16 x; memcpy(&x, p, sizeof x); return x; }
static inline void st(float *p, v16 x) { memcpy(p, &x, sizeof x); }

/* s[r][0:BC] = q[r] . kt (kt: D x BC, transposed key tile), for n rows of q (row stride D). */
static void scores(const float *q, int n, int D, const float *kt, float *s) {
  int r = 0;
  for (; r + 4 <= n; r += 4) {
    v16 a[4][4];
    for (int i = 0; i < 4; i++)
      for (int c = 0; c < 4; c++) a[i][c] = (v16){0};
    for (int d = 0; d < D; d++) {
      const float *k = kt + d * BC;
      v16 k0 = ld(k), k1 = ld(k + 16), k2 = ld(k + 32), k3 = ld(k + 48);
      for (int i = 0; i < 4; i++) {
        float b = q[(r + i) * D + d];
        a[i][0] += b * k0, a[i][1] += b * k1, a[i][2] += b * k2, a[i][3] += b * k3;
      }
    }
    for (int i = 0; i < 4; i++)
      for (int c = 0; c < 4; c++) st(s + (r + i) * BC + 16 * c, a[i][c]);
  }
  for (; r < n; r++) {
    v16 a[4] = {(v16){0}, (v16){0}, (v16){0}, (v16){0}};
    for (int d = 0; d < D; d++)
      for (int c = 0; c < 4; c++) a[c] += q[r * D + d] * ld(kt + d * BC + 16 * c);
    for (int c = 0; c < 4; c++) st(s + r * BC + 16 * c, a[c]);
  }
}

/* o[r][c0:c0+64] += p[r][0:nk] . v[0:nk][c0:c0+64], for n rows (o row stride D, v row stride vs). */
static void weigh(const float *p, int n, int nk, const float *v, int64_t vs, int D, float *o) {
  for (int c0 = 0; c0 < D; c0 += 64) {
    int r = 0;
    for (; r + 4 <= n; r += 4) {
      v16 a[4][4];
      for (int i = 0; i < 4; i++)
        for (int c = 0; c < 4; c++) a[i][c] = ld(o + (r + i) * D + c0 + 16 * c);
      for (int j = 0; j < nk; j++) {
        const float *vj = v + j * vs + c0;
        v16 v0 = ld(vj), v1 = ld(vj + 16), v2 = ld(vj + 32), v3 = ld(vj + 48);
        for (int i = 0; i < 4; i++) {
          float b = p[(r + i) * BC + j];
          a[i][0] += b * v0, a[i][1] += b * v1, a[i][2] += b * v2, a[i][3] += b * v3;
        }
      }
      for (int i = 0; i < 4; i++)
        for (int c = 0; c < 4; c++) st(o + (r + i) * D + c0 + 16 * c, a[i][c]);
    }
    for (; r < n; r++) {
      v16 a[4];
      for (int c = 0; c < 4; c++) a[c] = ld(o + r * D + c0 + 16 * c);
      for (int j = 0; j < nk; j++)
        for (int c = 0; c < 4; c++) a[c] += p[r * BC + j] * ld(v + j * vs + c0 + 16 * c);
      for (int c = 0; c < 4; c++) st(o + r * D + c0 + 16 * c, a[c]);
    }
  }
}

/* Keys [t0, t0 + nk) of rows at k (row stride ks) into kt, transposed; columns past nk are zero. */
static void pack_keys(const float *k, int64_t ks, int t0, int nk, int D, float *kt) {
  for (int j = 0; j < nk; j++) {
    const float *kj = k + (int64_t)(t0 + j) * ks;
    for (int d = 0; d < D; d++) kt[d * BC + j] = kj[d];
  }
  for (int d = 0; d < D; d++)
    for (int j = nk; j < BC; j++) kt[d * BC + j] = 0.f;
}

/* Query rows [p0, p0 + n) of one query head (row stride rs) into q, times scale. */
static void pack_rows(const float *src, int64_t rs, int p0, int n, int D, float scale, float *q) {
  for (int i = 0; i < n; i++)
    for (int d = 0; d < D; d++) q[i * D + d] = src[(int64_t)(p0 + i) * rs + d] * scale;
}

/* Floats of work memory podkv_pod_prefill needs: every key tile transposed, then one task buffer per thread.
 * Why the caller's memory: buffers this size from malloc are fresh mmap pages on every call, and faulting them in
 * cost more than the kernel saved at 1K (one page fault per 4 KB, each zeroed). */
static size_t task_floats(int G, int D) { return 3 * (size_t)G * BR * D + 2 * BR * BC + 2 * (size_t)G * BR; }
int64_t podkv_pod_prefill_work(int H, int G, int T, int D, int threads) {
  return (int64_t)H * 2 * ((T + BC - 1) / BC) * D * BC + (int64_t)threads * task_floats(G, D);
}

/* Per KV head, FIELDS int64: kind, own query ptr, its head stride and row stride, distant query ptr, head
 * stride, row stride, own key ptr, row stride, anchor key ptr, row stride, value ptr, row stride.
 * Pointers are to float32; strides in float32 elements. The G query heads of KV head h are out rows h*G .. h*G+G-1
 * of out (Hq, T, D) contiguous. ``work``: podkv_pod_prefill_work(...) floats. Returns 0, or -1 where the shape is
 * outside what this kernel takes. */
int podkv_pod_prefill(int H, int G, int T, int D, int ns, int nr, float scale, const int64_t *f, float *out,
                      float *work, int threads) {
  if (G > MAXG || D % 64 != 0 || nr < 1 || ns < 0) return -1;
  int nb = (T + BR - 1) / BR, nt = (T + BC - 1) / BC;
  /* Every key tile transposed once per call (own keys, and the anchor's for shared heads), not once per row block:
   * [head][own, distant][tile] of D x BC. */
  size_t tile = (size_t)D * BC;
  float *kt_all = work, *tasks = work + (size_t)H * 2 * nt * tile;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int task = 0; task < H * 2 * nt; task++) {
    int h = task / (2 * nt), which = task / nt % 2, t = task % nt, t0 = t * BC;
    const int64_t *hf = f + FIELDS * h;
    if (which == 1 && hf[0] != 1) continue; /* only shared heads read the anchor's keys */
    const float *k = (const float *)(intptr_t)hf[which ? 9 : 7];
    pack_keys(k, hf[which ? 10 : 8], t0, T - t0 < BC ? T - t0 : BC, D, kt_all + ((size_t)h * 2 + which) * nt * tile
              + (size_t)t * tile);
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int task = 0; task < H * nb; task++) {
    int h = task / nb, rb = nb - 1 - task % nb; /* latest rows first: they have the most keys */
    int p0 = rb * BR, n = T - p0 < BR ? T - p0 : BR, p1 = p0 + n;
    const int64_t *hf = f + FIELDS * h;
    int kind = (int)hf[0];
    const float *qo = (const float *)(intptr_t)hf[1], *qd = (const float *)(intptr_t)hf[4];
    const float *v = (const float *)(intptr_t)hf[11];
    const float *kt_own = kt_all + (size_t)h * 2 * nt * tile, *kt_dist = kt_own + nt * tile;
    int64_t qo_hs = hf[2], qo_rs = hf[3], qd_hs = hf[5], qd_rs = hf[6], v_rs = hf[12];
    size_t rows = (size_t)G * BR * D;
    float *buf = tasks + (size_t)omp_get_thread_num() * task_floats(G, D);
    float *q_own = buf, *q_dist = q_own + rows, *o = q_dist + rows;
    float *s_own = o + rows, *s_dist = s_own + BR * BC, *peak = s_dist + BR * BC, *total = peak + G * BR;
    int distant_rows = kind == 1 && p1 - 1 - nr >= ns; /* some row of the block has a distant key */
    for (int g = 0; g < G; g++) {
      pack_rows(qo + g * qo_hs, qo_rs, p0, n, D, scale, q_own + (size_t)g * BR * D);
      if (distant_rows) pack_rows(qd + g * qd_hs, qd_rs, p0, n, D, scale, q_dist + (size_t)g * BR * D);
    }
    memset(o, 0, sizeof(float) * rows);
    for (int i = 0; i < G * BR; i++) peak[i] = NEG, total[i] = 0.f;
    for (int t0 = 0; t0 < p1; t0 += BC) {
      int nk = p1 - t0 < BC ? p1 - t0 : BC, t1 = t0 + nk;
      /* Which keys of the tile some row reads with its own query (sinks, window; every key for kind 0) and
       * which with the distant one. A tile that needs only one kind is scored into s_own with that kind's query
       * and keys (most tiles: only the band's edges and the sinks' tile need both). */
      int any_own = kind == 0 || t0 < ns || t1 - 1 > p0 - nr;
      int any_dist = distant_rows && (t0 > ns ? t0 : ns) <= p1 - 1 - nr && t1 > ns;
      if (!any_own && !any_dist) continue; /* a window-only head's distant tile */
      int both = any_own && any_dist;
      const float *kt_o = kt_own + (size_t)(t0 / BC) * tile, *kt_d = kt_dist + (size_t)(t0 / BC) * tile;
      for (int g = 0; g < G; g++) {
        float *og = o + (size_t)g * BR * D, *pk = peak + g * BR, *tt = total + g * BR;
        if (any_own) scores(q_own + (size_t)g * BR * D, n, D, kt_o, s_own);
        if (any_dist) scores(q_dist + (size_t)g * BR * D, n, D, kt_d, both ? s_dist : s_own);
        for (int r = 0; r < n; r++) {
          int i = p0 + r;
          /* Tile columns: [0, a) sinks, [a, b) distant, [b, c) window (own), [c, BC) not visible. */
          int c = i + 1 - t0, a = ns - t0, b = i - nr + 1 - t0;
          c = c < 0 ? 0 : c > nk ? nk : c;
          a = a < 0 ? 0 : a > c ? c : a;
          b = kind == 0 ? a : (b < a ? a : b > c ? c : b);
          float *so = s_own + r * BC, *sd = s_dist + r * BC, m = pk[r];
          float sum = 0.f;
          if (c == nk && (any_dist && !both ? (a == 0 && b == nk) : a == b)) {
            /* every column visible and of the kind s_own holds: no selection */
            for (int j = 0; j < nk; j++) m = so[j] > m ? so[j] : m;
            for (int j = 0; j < nk; j++) {
              float e = exp2f(so[j] - m);
              so[j] = e;
              sum += e;
            }
          } else {
            int dist = kind == 1;
            for (int j = 0; j < c; j++) {
              float x = (j >= a && j < b) ? (!dist ? NEG : both ? sd[j] : so[j]) : so[j];
              so[j] = x;
              m = x > m ? x : m;
            }
            if (m == NEG) { /* nothing visible yet in this row (a window head's distant tile) */
              for (int j = 0; j < BC; j++) so[j] = 0.f;
              continue;
            }
            for (int j = 0; j < BC; j++) {
              float e = j < c && !(!dist && j >= a && j < b) ? exp2f(so[j] - m) : 0.f;
              so[j] = e;
              sum += e;
            }
          }
          float corr = exp2f(pk[r] - m); /* pk = NEG: corr = 0, and o, total are still 0 */
          tt[r] = tt[r] * corr + sum;
          pk[r] = m;
          if (corr != 1.f)
            for (int d = 0; d < D; d++) og[r * D + d] *= corr;
        }
        weigh(s_own, n, nk, v + (int64_t)t0 * v_rs, v_rs, D, og);
      }
    }
    for (int g = 0; g < G; g++)
      for (int r = 0; r < n; r++) {
        float inv = 1.f / total[g * BR + r], *dst = out + ((int64_t)(h * G + g) * T + p0 + r) * D;
        const float *src = o + ((size_t)g * BR + r) * D;
        for (int d = 0; d < D; d++) dst[d] = src[d] * inv;
      }
  }
  return 0;
}
