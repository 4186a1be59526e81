/* The distant pass of a batch-1 decode step for every block an anchor layer heads (issue 19), in one call.
 *
 * Per anchor (layer, KV head) "pair": the step's few query rows (the KV head's G query heads, already scaled
 * to base 2) score the anchor's distant keys once; every member layer of the block weighs its own values with
 * those scores. Written as [o | peak | total] per member and row, o = sum_j 2^(s_j - peak) v_j and
 * total = sum_j 2^(s_j - peak): the unnormalised form podkv.attention.block_pass merges with the proximal pass.
 *
 * Why C: each pair is a (3 rows x 4K keys) product, which BLAS runs at about half the memory bandwidth a
 * streaming loop gets (docs/bench.md). Here each key and each value row is read once, in chunks that run in
 * parallel on torch's own OpenMP pool (torch's libgomp is already loaded under the same soname), with the
 * softmax statistics merged across chunks. Every chunk holds at least one key, so no infinity is ever formed
 * (the file is built with -ffast-math for vectorised exp2f). */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Partial pass of one pair over keys [c0, c1): scores to s, peak and total per row, o per member and row. */
static void chunk_pass(const float *q, int rows, int D, const float *k, int64_t ks, int c0, int c1, int nm,
                       const int64_t *v_ptrs, const int64_t *v_strides, float *s, float *o, float *peak,
                       float *total) {
  int w = c1 - c0;
  for (int j = 0; j < w; j++) {
    const float *kj = k + (int64_t)(c0 + j) * ks;
    for (int r = 0; r < rows; r++) {
      const float *qr = q + (int64_t)r * D;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int d = 0; d < D; d++) acc += qr[d] * kj[d];
      s[(int64_t)r * w + j] = acc;
    }
  }
  for (int r = 0; r < rows; r++) {
    float *sr = s + (int64_t)r * w, m = sr[0], t = 0.f;
    for (int j = 1; j < w; j++) m = sr[j] > m ? sr[j] : m;
#pragma omp simd reduction(+ : t)
    for (int j = 0; j < w; j++) {
      float e = exp2f(sr[j] - m);
      sr[j] = e;
      t += e;
    }
    peak[r] = m;
    total[r] = t;
  }
  for (int mm = 0; mm < nm; mm++) {
    float *om = o + (int64_t)mm * rows * D;
    const float *vm = (const float *)(intptr_t)v_ptrs[mm];
    memset(om, 0, sizeof(float) * rows * D);
    for (int j = 0; j < w; j++) {
      const float *vj = vm + (int64_t)(c0 + j) * v_strides[mm];
      for (int r = 0; r < rows; r++) {
        float p = s[(int64_t)r * w + j], *orow = om + (int64_t)r * D;
#pragma omp simd
        for (int d = 0; d < D; d++) orow[d] += p * vj[d];
      }
    }
  }
}

/* npairs pairs over the same n distant keys. Pair i: query rows at q_ptrs[i] (rows x D, contiguous), keys at
 * k_ptrs[i] (n rows, row stride k_strides[i] floats), n_members[i] members whose values (v_ptrs, v_strides)
 * and output cells (out_ptrs: rows x (D + 2), contiguous) follow pair by pair. work: at least
 * npairs * ceil(n / chunk) * (rows * chunk + max_members * rows * D + 2 * rows) floats, one slice per task
 * (pair, chunk): [scores | o per member | peak | total]; threads: torch's intra-op count. Returns 0, or 1 for
 * more than 256 pairs or 1024 chunks (the caller then takes the PyTorch path). */
int podkv_block_decode(int npairs, int rows, int D, int n, int chunk, const int64_t *q_ptrs, const int64_t *k_ptrs,
                       const int64_t *k_strides, const int32_t *n_members, const int64_t *v_ptrs,
                       const int64_t *v_strides, const int64_t *out_ptrs, int max_members, float *work,
                       int threads) {
  int nchunks = (n + chunk - 1) / chunk;
  int64_t per = (int64_t)rows * chunk + (int64_t)max_members * rows * D + 2 * rows;
  int64_t first[256];
  if (npairs > 256 || nchunks > 1024) return 1;
  first[0] = 0;
  for (int i = 1; i < npairs; i++) first[i] = first[i - 1] + n_members[i - 1];
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int task = 0; task < npairs * nchunks; task++) {
    int i = task / nchunks, c = task % nchunks;
    int c0 = c * chunk, c1 = c0 + chunk < n ? c0 + chunk : n;
    float *base = work + (int64_t)task * per;
    float *o = base + (int64_t)rows * chunk, *peak = o + (int64_t)max_members * rows * D, *total = peak + rows;
    chunk_pass((const float *)(intptr_t)q_ptrs[i], rows, D, (const float *)(intptr_t)k_ptrs[i], k_strides[i], c0,
               c1, n_members[i], v_ptrs + first[i], v_strides + first[i], base, o, peak, total);
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int i = 0; i < npairs; i++) {
    const float *tasks = work + (int64_t)i * nchunks * per;  /* this pair's chunk slices */
    const int64_t o_at = (int64_t)rows * chunk, peak_at = o_at + (int64_t)max_members * rows * D;
    for (int r = 0; r < rows; r++) {
      float m = -3.0e38f, t = 0.f, scale[1024];
      for (int c = 0; c < nchunks; c++) m = tasks[c * per + peak_at + r] > m ? tasks[c * per + peak_at + r] : m;
      for (int c = 0; c < nchunks; c++) {
        const float *peak = tasks + c * per + peak_at;
        scale[c] = exp2f(peak[r] - m);
        t += scale[c] * peak[rows + r];
      }
      for (int mm = 0; mm < n_members[i]; mm++) {
        float *cell = (float *)(intptr_t)out_ptrs[first[i] + mm] + (int64_t)r * (D + 2);
        for (int d = 0; d < D; d++) cell[d] = 0.f;
        for (int c = 0; c < nchunks; c++) {
          const float *o = tasks + c * per + o_at + ((int64_t)mm * rows + r) * D;
          float a = scale[c];
#pragma omp simd
          for (int d = 0; d < D; d++) cell[d] += a * o[d];
        }
        cell[D] = m;
        cell[D + 1] = t;
      }
    }
  }
  return 0;
}

/* The proximal pass of a batch-1 decode step and its merge with the step's distant part, for one layer: H KV
 * heads, R query rows each (q: H x R x D, contiguous, unscaled). The n own keys and values of a head are read
 * where the cache holds them, without copying them next to each other: values (and an anchor head's keys) are
 * the cache rows of nruns runs [a, b) (the held sinks and window slots, then the step's tokens); a head whose
 * distant keys are shared holds its first n1 keys in its ring (row stride krs) and the step's in key2.
 * head[h] = {kptr, krs, kptr2, krs2, n1 (-1: keys by runs, like values), vptr, vrs}. keep (R x n bytes, or NULL:
 * all) hides keys from rows; a row always sees its own key. cells (or NULL: no distant part): [o | peak | total]
 * per (head, row) at cells + h * c_hs + r * c_rs, as podkv_block_decode writes them; total 0 marks a head without
 * distant keys, whose peak is never read (it may be -inf, which -ffast-math code must not touch). out: H x R x D;
 * s: n floats of scratch. The same softmax as block_pass._proximal_merged: m = max(own scores, peak), weights
 * 2^(s - m). */
#define HEAD_FIELDS 7
void podkv_proximal_merge(int H, int R, int D, int n, int nruns, const int64_t *runs, const int64_t *head,
                          const float *q, const uint8_t *keep, const float *cells, int64_t c_hs, int64_t c_rs,
                          float scale, float *out, float *s, const float **krow, const float **vrow) {
  for (int h = 0; h < H; h++) {
    const int64_t *f = head + (int64_t)h * HEAD_FIELDS;
    const float *kb = (const float *)(intptr_t)f[0], *kb2 = (const float *)(intptr_t)f[2];
    const float *vb = (const float *)(intptr_t)f[5];
    int64_t krs = f[1], krs2 = f[3], n1 = f[4], vrs = f[6];
    int j = 0;
    for (int u = 0; u < nruns; u++)
      for (int64_t t = runs[2 * u]; t < runs[2 * u + 1] && j < n; t++, j++) {
        vrow[j] = vb + t * vrs;
        krow[j] = n1 < 0 ? kb + t * krs : (j < n1 ? kb + (int64_t)j * krs : kb2 + (int64_t)(j - n1) * krs2);
      }
    for (int r = 0; r < R; r++) {
      const float *qr = q + ((int64_t)h * R + r) * D;
      const uint8_t *kr = keep ? keep + (int64_t)r * n : 0;
      float *orow = out + ((int64_t)h * R + r) * D;
      float m = -3.0e38f, den = 0.f;
      for (int i = 0; i < n; i++) {
        const float *ki = krow[i];
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int d = 0; d < D; d++) acc += qr[d] * ki[d];
        s[i] = acc * scale;
        if (!kr || kr[i]) m = s[i] > m ? s[i] : m;
      }
      const float *cell = cells ? cells + (int64_t)h * c_hs + (int64_t)r * c_rs : 0;
      int distant = cell && cell[D + 1] > 0.f;
      if (distant && cell[D] > m) m = cell[D];
      for (int d = 0; d < D; d++) orow[d] = 0.f;
      for (int i = 0; i < n; i++) {
        if (kr && !kr[i]) continue;
        float e = exp2f(s[i] - m);
        const float *vi = vrow[i];
        den += e;
#pragma omp simd
        for (int d = 0; d < D; d++) orow[d] += e * vi[d];
      }
      if (distant) {
        float w = exp2f(cell[D] - m);
        den += w * cell[D + 1];
#pragma omp simd
        for (int d = 0; d < D; d++) orow[d] += w * cell[d];
      }
      float inv = 1.f / den;
#pragma omp simd
      for (int d = 0; d < D; d++) orow[d] *= inv;
    }
  }
}
