#pragma once
#include <type_traits>
#include "config.cuh"

// Conversions and the rounding points of the reference: every value the PyTorch reference holds in
// the model dtype is rounded to it here too, so both compute the same function up to summation order.
namespace mk {

__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(float v) { return v; }

template <class U> __device__ U cast_from_f(float v);
template <> __device__ __forceinline__ __nv_bfloat16 cast_from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half cast_from_f<__half>(float v) { return __float2half_rn(v); }
__device__ __forceinline__ T from_f(float v) { return cast_from_f<T>(v); }
__device__ __forceinline__ float rnd(float v) { return to_f(from_f(v)); }

// Two packed elements -> float2.
template <class U> __device__ float2 pair_as_f2(uint32_t u);
template <> __device__ __forceinline__ float2 pair_as_f2<__nv_bfloat16>(uint32_t u) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
}
template <> __device__ __forceinline__ float2 pair_as_f2<__half>(uint32_t u) {
  return __half22float2(*reinterpret_cast<const __half2*>(&u));
}
__device__ __forceinline__ float2 pair_to_f2(uint32_t u) { return pair_as_f2<T>(u); }

// Four int8 codes of a word, each exactly as a float, without I2F (a quarter-rate conversion that bounded
// the batch-1 step, perf note 29): code + 128 as the low mantissa byte of 2^23 (one byte permute), then one
// subtraction of 2^23 + 128. codes_as_floats in tests/codegen/test_int8_unpack.py emulates it bit for bit.
__device__ __forceinline__ void i8x4_to_f(uint32_t w, float* f) {
  constexpr float OFFSET = 8388736.f;              // 2^23 + 128
  const uint32_t u = w ^ 0x80808080u;              // each byte: code + 128, 0..255
  f[0] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440)) - OFFSET;
  f[1] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7441)) - OFFSET;
  f[2] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7442)) - OFFSET;
  f[3] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7443)) - OFFSET;
}

// Dot product of 16 int8 weight codes (one 16-byte vector) with 16 inputs (two vectors of 8), in fp32; the
// row's scale multiplies the sum later (int8 weight-only: w = scale * code, exact in fp32).
__device__ __forceinline__ float dot16_i8(const uint4& w, const uint4& x0, const uint4& x1, float acc) {
  const uint32_t wv[4] = {w.x, w.y, w.z, w.w};
  const uint32_t xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float c[4];
    i8x4_to_f(wv[q], c);
    const float2 a = pair_to_f2(xv[2 * q]), b = pair_to_f2(xv[2 * q + 1]);
    acc = fmaf(c[0], a.x, acc); acc = fmaf(c[1], a.y, acc);
    acc = fmaf(c[2], b.x, acc); acc = fmaf(c[3], b.y, acc);
  }
  return acc;
}

// int4 code i (bits 4i..4i+3) of a word minus 8, the symmetric formats' offset, exactly as a float: the nibble
// under the exponent of 2^23, one subtraction of 2^23 + 8 (tests/codegen/test_int8_unpack.py emulates it).
__device__ __forceinline__ float i4_code(uint32_t w, int i) {
  return __uint_as_float(((w >> (4 * i)) & 0xFu) | 0x4B000000u) - 8388616.f;
}

// Dot product of 32 int4 codes (one 16-byte vector; element 8q + i in bits 4i of word q) with 32 inputs (four
// vectors of 8), in fp32; the group's scale multiplies it after.
__device__ __forceinline__ float dot32_i4(const uint4& w, const uint4* x) {
  const uint32_t wv[4] = {w.x, w.y, w.z, w.w};
  float acc = 0.f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t xv[4] = {x[q].x, x[q].y, x[q].z, x[q].w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 a = pair_to_f2(xv[j]);
      acc = fmaf(i4_code(wv[q], 2 * j), a.x, acc);
      acc = fmaf(i4_code(wv[q], 2 * j + 1), a.y, acc);
    }
  }
  return acc;
}

// Codes as pairs of the model dtype for the tensor cores' operands, exact, without any conversion
// instruction: a code put under the exponent of 128 (bf16 0x4300, 7 mantissa bits) or 1024 (fp16 0x6400,
// 10) by one AND-OR (a LOP3), then one paired subtraction. mma_tiles.py lays the codes out so each pair
// lands in the order the mma consumes; tests/codegen/test_mma_unpack.py emulates both bit for bit.
constexpr bool T_IS_BF16 = std::is_same<T, __nv_bfloat16>::value;
__device__ __forceinline__ uint32_t sub_pairs(uint32_t a, uint32_t b) {
  uint32_t r;
  if constexpr (T_IS_BF16) {
    const __nv_bfloat162 v = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
    r = *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    r = *reinterpret_cast<const uint32_t*>(&v);
  }
  return r;
}

// 8 int4 codes of a word minus their zero point z (8 for the symmetric formats): pair p holds the nibbles at
// bits 4p (low half) and 16 + 4p. `zero` is z under the same exponent in both halves (i4_zero_pair).
constexpr uint32_t I4_MAGIC = T_IS_BF16 ? 0x43004300u : 0x64006400u;   // 128 | 1024 in both halves
constexpr uint32_t ONE_PAIR = T_IS_BF16 ? 0x3F803F80u : 0x3C003C00u;   // 1.0 in both halves
__device__ __forceinline__ uint32_t i4_zero_pair(uint32_t z) { return z * 0x00010001u | I4_MAGIC; }
__device__ __forceinline__ void i4x8_to_pairs(uint32_t w, uint32_t* b, uint32_t zero = i4_zero_pair(8)) {
#pragma unroll
  for (int p = 0; p < 4; ++p) b[p] = sub_pairs(((w >> (4 * p)) & 0x000F000Fu) | I4_MAGIC, zero);
}

// 4 int8 codes of a word: pair 0 holds bytes 0 and 2, pair 1 bytes 1 and 3. bf16 has 7 mantissa bits for
// 8-bit codes: the low 7 bits go under 128, and the sign bit picks 128 or 256 to subtract.
__device__ __forceinline__ void i8x4_to_pairs(uint32_t w, uint32_t* b) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if constexpr (T_IS_BF16) {
      const uint32_t u = w >> (8 * h);
      b[h] = sub_pairs((u & 0x007F007Fu) | 0x43004300u, (u & 0x00800080u) | 0x43004300u);
    } else {
      const uint32_t u = (w ^ 0x80808080u) >> (8 * h);   // code + 128 under 1024, minus 1152
      b[h] = sub_pairs((u & 0x00FF00FFu) | 0x64006400u, 0x64806480u);
    }
  }
}

// 4 fp8 e4m3 codes of a word, in the same byte pairs as i8x4_to_pairs: the hardware's exact e4m3 pair
// conversion to fp16 (every e4m3 value is an fp16 value), and for bf16 on through fp32 (exact again: bf16's
// exponent covers fp16's, and e4m3's 3 mantissa bits fit its 7).
__device__ __forceinline__ uint32_t e4m3x2_to_pair(uint32_t two) {   // two codes in the low 16 bits
  uint32_t h;
  asm("{ .reg .b16 lo; cvt.u16.u32 lo, %1; cvt.rn.f16x2.e4m3x2 %0, lo; }" : "=r"(h) : "r"(two));
  if constexpr (T_IS_BF16) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    return *reinterpret_cast<const uint32_t*>(&b);
  } else {
    return h;
  }
}
__device__ __forceinline__ void e4m3x4_to_pairs(uint32_t w, uint32_t* b) {
  b[0] = e4m3x2_to_pair(__byte_perm(w, 0, 0x0020));   // bytes 0 and 2
  b[1] = e4m3x2_to_pair(__byte_perm(w, 0, 0x0031));   // bytes 1 and 3
}

// Dot product of 8 weights with 8 inputs (each a 16-byte vector), accumulated in fp32.
__device__ __forceinline__ float dot8(const uint4& w, const uint4& x, float acc) {
  float2 a = pair_to_f2(w.x), b = pair_to_f2(x.x);
  acc = fmaf(a.x, b.x, acc); acc = fmaf(a.y, b.y, acc);
  a = pair_to_f2(w.y); b = pair_to_f2(x.y);
  acc = fmaf(a.x, b.x, acc); acc = fmaf(a.y, b.y, acc);
  a = pair_to_f2(w.z); b = pair_to_f2(x.z);
  acc = fmaf(a.x, b.x, acc); acc = fmaf(a.y, b.y, acc);
  a = pair_to_f2(w.w); b = pair_to_f2(x.w);
  acc = fmaf(a.x, b.x, acc); acc = fmaf(a.y, b.y, acc);
  return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Activations written by other blocks in this launch are read through L2 (ld.global.cg): a stale
// L1 line from an earlier read must never be seen after a counter wait.
__device__ __forceinline__ float ld_act(const T* p) {
  unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
  return to_f(*reinterpret_cast<const T*>(&bits));
}

// DPL consecutive head dims of one cache row, kept packed (DW 32-bit words) until used so that several
// rows fit in registers at once; loaded with the widest access their alignment allows.
constexpr int DW = (DPL + 1) / 2;
__device__ __forceinline__ void ld_dims(const T* src, uint32_t* w) {
  if constexpr (DPL % 4 == 0) {
#pragma unroll
    for (int j = 0; j < DW; j += 2) {
      const uint2 u = *reinterpret_cast<const uint2*>(src + 2 * j);
      w[j] = u.x; w[j + 1] = u.y;
    }
  } else if constexpr (DPL % 2 == 0) {
#pragma unroll
    for (int j = 0; j < DW; ++j) w[j] = *reinterpret_cast<const uint32_t*>(src + 2 * j);
  } else {
    w[0] = *reinterpret_cast<const unsigned short*>(src);
  }
}

__device__ __forceinline__ void unpack_dims(const uint32_t* w, float* f) {
#pragma unroll
  for (int j = 0; j < DW; ++j) {
    const float2 a = pair_to_f2(w[j]);
    f[2 * j] = a.x;
    if (2 * j + 1 < DPL) f[2 * j + 1] = a.y;
  }
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

}  // namespace mk
