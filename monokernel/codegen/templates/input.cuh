// Staging of a matrix-vector op's input vector (B x K, model dtype) into `in`: RMSNorm is recomputed
// by every block from the L2-resident residual rather than adding a grid-wide barrier.
namespace mk {

// in[b][k] = w[k] * rnd(x[b][k] * rsqrt(mean(x[b]^2) + eps)), as the reference's RMSNorm.
__device__ void stage_rmsnorm(T* in, const T* x, const T* w, int len) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b = warp; b < B; b += NCW) {
    const T* xb = x + (size_t)b * len;
    float ss = 0.f;
    for (int k = lane; k < len; k += 32) { float v = ld_act(xb + k); ss = fmaf(v, v, ss); }
    const float r = rsqrtf(warp_sum(ss) / len + EPS);
    for (int k = lane; k < len; k += 32)
      in[b * INPUT_LEN + k] = from_f(to_f(w[k]) * rnd(ld_act(xb + k) * r));
  }
}

__device__ void stage_copy(T* in, const T* src, int len) {
  for (int i = threadIdx.x; i < B * len; i += NCT) {
    const int b = i / len, k = i % len;
    in[b * INPUT_LEN + k] = from_f(ld_act(src + i));
  }
}

// Log-sum-exp combine of the KV splits of layer `layer` -> attention output (B x QSIZE).
__device__ void stage_attention(T* in, const Params& p, int layer) {
  for (int i = threadIdx.x; i < B * QSIZE; i += NCT) {
    const int b = i / QSIZE, hq = (i % QSIZE) / D, d = i % D;
    const int kvh = hq / G, g = hq % G;
    const size_t base = (((size_t)layer * B + b) * NKV + kvh) * KV_SPLITS;   // (s, g) follow
    float m = -INFINITY;
    for (int s = 0; s < KV_SPLITS; ++s) m = fmaxf(m, __ldcg(p.attn_m + (base + s) * G + g));
    float num = 0.f, den = 0.f;
    for (int s = 0; s < KV_SPLITS; ++s) {
      const float ms = __ldcg(p.attn_m + (base + s) * G + g);
      if (ms == -INFINITY) continue;       // an empty split
      const float c = expf(ms - m);
      den = fmaf(c, __ldcg(p.attn_l + (base + s) * G + g), den);
      num = fmaf(c, __ldcg(p.attn_o + ((base + s) * G + g) * D + d), num);
    }
    in[b * INPUT_LEN + hq * D + d] = from_f(num / den);
  }
}

}  // namespace mk
