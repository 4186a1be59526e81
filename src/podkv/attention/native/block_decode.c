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
