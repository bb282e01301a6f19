// Decode and extend attention over the packed KV pool on a CPU, reading the packed code rows directly.
//
// Plain C++ and OpenMP, no torch headers (it compiles in about two seconds); kernels/cpu_attention.py builds it on
// first use and calls it through ctypes on tensor data pointers. The math is DESIGN.md section 3 in the quantizer's
// *storage basis* W (E, d): a vector's decoded row y (E floats, coordinates in the order its code bytes hold them)
// satisfies x~ = y @ W, so each query is turned into that basis (q @ W_k^T) and each output out of it (acc @ W_v)
// once, by the entry points at the end of this file; in between only codes, norms and fp32 rows of at most one tile
// live. The same library writes new K/V (the write section): one vector at a time, in a fixed order.
//
//   score_i = sm_scale * (n_i c_i . q_s [+ n_i gamma_i qjl_scale s_i . q_qjl])     (optionally tanh-capped)
//   acc     = sum_i p_i (n_i c_i [, n_i gamma_i qjl_scale s_i])                    (p: softmax of the scores)
//
// Reduction order is fixed by the code, never by the thread count, the batch or the vector width:
// - every dot product runs over 16 explicit lanes folded by a fixed tree (decode), or sequentially over the
//   coordinates (extend), so a vectorising compiler cannot reorder it (no -ffast-math);
// - keys are visited in tiles aligned to absolute positions; decode splits a request's keys into chunks of
//   DECODE_CHUNK keys at fixed positions, each an independent online softmax, folded left to right;
// - threads only take whole work items (request, KV head, chunk / query block), whose results do not depend on
//   which thread ran them.
// So a request's output is bitwise the same alone or in a batch, on 1 or N threads, and an extend row's output
// depends only on its own query, its position and the keys up to it (prefix cached or computed: the same).
//
// Sliding window W (window >= 0; -1: none), as SGLang masks it: the query at position p sees keys p - W .. p. Keys
// outside every query's window are never read: a decode's chunks start at the window's chunk and its first chunk at
// the window start (both functions of the request alone); an extend block starts at the key tile holding its first
// row's window start, and inside a tile a row's scores are masked outside its own window (keys below the block's
// window start are not decoded: zeros, with zero weight). A row's tiles that hold none of its keys leave its state
// exactly as it is, so the order of its reduction is still fixed by absolute tile positions.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int kAbiVersion = 3;
constexpr int kMaxOps = 8;
constexpr int kLanes = 16;
constexpr int64_t kDecodeChunk = 512;  // keys per decode work item (a fixed split: part of the reduction order)
constexpr int kDecodeTile = 32;        // keys scored before their softmax update (decode)
constexpr int kExtendTile = 64;        // keys per extend tile (a multiple of 16)
constexpr int kExtendRows = 128;       // query rows (tokens x group) per extend work item, about
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace

extern "C" {

// One step of decoding a code row into storage-basis floats. Kinds:
//   1, 2, 3: a single-plane segment of 4, 2, 1 bits: byte j -> table[byte] (2, 4, 8 floats) at dst + j * per_byte
//   4: a 3-bit segment (a 2-bit low plane at src, nbytes bytes, and a 1-bit high plane at src2): byte j of the low
//      plane and the high bits of its channels index a joint table of 4 floats (see cpu_attention.py)
//   5: the raw bfloat16 vector (nbytes = 2 * head_dim) -> floats at dst
//   11, 12, 13, 14 (AVX2 builds only, planes of a multiple of 8 bytes, 3-bit: high plane too): kinds 1, 2, 3, 4
//      decoded 8 bytes at a time with the codebook in registers (table: the codebook repeated to 16 floats),
//      in channel order: field k of byte j -> dst + k * nbytes + j. About 10x fewer instructions than a table
//      row per byte.
struct DecodeOp {
    int32_t kind;
    int32_t src;
    int32_t nbytes;
    int32_t src2;
    int32_t dst;
    int32_t pad;
    const float* table;
};

// How to decode one packed vector of a layout: the ops, the width E of its decoded row, its norms.
struct VectorSpec {
    int32_t code_bytes;
    int32_t width;             // E: head_dim, or 2 * head_dim for prod (the QJL signs follow the values)
    int32_t head_dim;
    int32_t norms_per_vector;  // 0 raw, 1 mse (n), 2 prod (n, gamma)
    int32_t norm_is_f32;       // else float16
    int32_t n_ops;
    int32_t zero_values;  // no code planes (1-bit prod): the value part of the row is zero
    float qjl_scale;
    DecodeOp ops[kMaxOps];
};

// A pool tensor pair (codes uint8 (slots, kv_heads, code_bytes), norms (slots, kv_heads, npv)), strides in elements.
struct PoolView {
    const uint8_t* codes;
    int64_t code_slot_stride;
    int64_t code_head_stride;
    const void* norms;
    int64_t norm_slot_stride;
    int64_t norm_head_stride;
};

int tq_abi_version() { return kAbiVersion; }

// Whether this build decodes with AVX2 (ops 11-14); the caller picks the op kinds, and the basis, accordingly.
int tq_has_avx2() {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

}  // extern "C"

namespace {

inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);  // exact for every half, subnormals included (the conversion ignores DAZ)
#else
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else {  // subnormal: mantissa * 2^-24, exact in float
            float value = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
            std::memcpy(&bits, &value, 4);
            bits |= sign;
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
#endif
}

inline float read_norm(const VectorSpec& spec, const PoolView& pool, int64_t slot, int64_t head, int which) {
    const int64_t at = slot * pool.norm_slot_stride + head * pool.norm_head_stride + which;
    if (spec.norm_is_f32) return static_cast<const float*>(pool.norms)[at];
    return half_to_float(static_cast<const uint16_t*>(pool.norms)[at]);
}

inline const uint8_t* code_row(const PoolView& pool, int64_t slot, int64_t head) {
    return pool.codes + slot * pool.code_slot_stride + head * pool.code_head_stride;
}

// Ask for the code rows and norms of upcoming keys ahead of use: rows sit at the pool's slots, usually scattered, so
// the hardware prefetcher cannot guess them and every row would otherwise wait a full memory latency (a profile
// of decode over shuffled slots spent 80% of its time on the first load of each row).
// A prefetch the optimiser must keep: GCC judges a function made only of __builtin_prefetch side-effect free and
// drops calls to it (the first build of this kernel had no prefetch instruction left).
inline void prefetch(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
    __builtin_prefetch(p);
#endif
}

inline void prefetch_rows(const VectorSpec& spec, const PoolView& pool, const int64_t* slots, int n, int64_t head) {
    for (int t = 0; t < n; ++t) {
        const uint8_t* row = code_row(pool, slots[t], head);
        prefetch(row);
        prefetch(row + spec.code_bytes - 1);
        if (spec.norms_per_vector) {
            const int64_t at = slots[t] * pool.norm_slot_stride + head * pool.norm_head_stride;
            prefetch(static_cast<const char*>(pool.norms) + at * (spec.norm_is_f32 ? 4 : 2));
        }
    }
}

template <int PER_BYTE>
inline void decode_table(const uint8_t* bytes, int nbytes, const float* table, float* out) {
    for (int j = 0; j < nbytes; ++j) std::memcpy(out + j * PER_BYTE, table + PER_BYTE * bytes[j], PER_BYTE * 4);
}

#ifdef __AVX2__
inline __m256i load8_u8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// centroids of codes 0..15: vpermps indexes 8 entries (bit 3 ignored), so two permutes and a blend on bit 3.
inline __m256 lookup16(__m256i code, __m256 low8, __m256 high8) {
    const __m256 a = _mm256_permutevar8x32_ps(low8, code);
    const __m256 b = _mm256_permutevar8x32_ps(high8, code);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
}

template <int BITS>
inline void decode_plane_simd(const uint8_t* src, int nbytes, const float* codebook, float* out) {
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    if constexpr (BITS == 4) {
        const __m256 low8 = _mm256_loadu_ps(codebook), high8 = _mm256_loadu_ps(codebook + 8);
        for (int j = 0; j < nbytes; j += 8) {
            const __m256i v = load8_u8(src + j);
            _mm256_storeu_ps(out + j, lookup16(_mm256_and_si256(v, mask), low8, high8));
            _mm256_storeu_ps(out + nbytes + j, lookup16(_mm256_srli_epi32(v, 4), low8, high8));
        }
    } else {
        const __m256 table = _mm256_loadu_ps(codebook);
        for (int j = 0; j < nbytes; j += 8) {
            const __m256i v = load8_u8(src + j);
            for (int k = 0; k < 8 / BITS; ++k) {
                const __m256i code = _mm256_and_si256(_mm256_srli_epi32(v, k * BITS), mask);
                _mm256_storeu_ps(out + k * nbytes + j, _mm256_permutevar8x32_ps(table, code));
            }
        }
    }
}

// A 3-bit segment, low 2-bit plane of n2 bytes and high 1-bit plane of n1 = n2 / 2 bytes (n1 a multiple of 8):
// channel j + k * n2 has its low bits in low byte j at 2k and its high bit in high byte j % n1 at 2k + j / n1.
inline void decode_split_simd(const uint8_t* low, const uint8_t* high, int n2, const float* codebook, float* out) {
    const int n1 = n2 / 2;
    const __m256 table = _mm256_loadu_ps(codebook);
    const __m256i three = _mm256_set1_epi32(3), one = _mm256_set1_epi32(1);
    for (int j = 0; j < n2; j += 8) {
        const __m256i lv = load8_u8(low + j);
        const __m256i hv = _mm256_srli_epi32(load8_u8(high + (j % n1)), j / n1);
        for (int k = 0; k < 4; ++k) {
            const __m256i code = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi32(lv, 2 * k), three),
                _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hv, 2 * k), one), 2));
            _mm256_storeu_ps(out + k * n2 + j, _mm256_permutevar8x32_ps(table, code));
        }
    }
}
#endif

// The storage-basis row of one packed vector (unscaled: centroids and +-1 signs; the norms are applied by callers).
inline void decode_row(const VectorSpec& spec, const uint8_t* row, float* out) {
    if (spec.zero_values) std::memset(out, 0, sizeof(float) * spec.head_dim);
    for (int o = 0; o < spec.n_ops; ++o) {
        const DecodeOp& op = spec.ops[o];
        float* dst = out + op.dst;
        const uint8_t* src = row + op.src;
        switch (op.kind) {
            case 1:
                decode_table<2>(src, op.nbytes, op.table, dst);
                break;
            case 2:
                decode_table<4>(src, op.nbytes, op.table, dst);
                break;
            case 3:
                decode_table<8>(src, op.nbytes, op.table, dst);
                break;
            case 4: {
                // Low byte j holds channels j + k * n2 (k = 0..3); their high bits sit in high byte j % n1 at bits
                // j / n1 + 2k (n1 = n2 / 2): shifted down and masked with 0x55 they index the joint table.
                const uint8_t* high = row + op.src2;
                const int n1 = op.nbytes / 2;
                for (int j = 0; j < n1; ++j) {
                    const int index = src[j] | ((high[j] & 0x55) << 8);
                    std::memcpy(dst + 4 * j, op.table + 4 * index, 16);
                }
                for (int j = 0; j < n1; ++j) {
                    const int index = src[n1 + j] | (((high[j] >> 1) & 0x55) << 8);
                    std::memcpy(dst + 4 * (n1 + j), op.table + 4 * index, 16);
                }
                break;
            }
            case 5: {
                const int n = op.nbytes / 2;
                for (int e = 0; e < n; ++e) {
                    const uint32_t bits = static_cast<uint32_t>(src[2 * e] | (src[2 * e + 1] << 8)) << 16;
                    std::memcpy(dst + e, &bits, 4);
                }
                break;
            }
#ifdef __AVX2__
            case 11:
                decode_plane_simd<4>(src, op.nbytes, op.table, dst);
                break;
            case 12:
                decode_plane_simd<2>(src, op.nbytes, op.table, dst);
                break;
            case 13:
                decode_plane_simd<1>(src, op.nbytes, op.table, dst);
                break;
            case 14:
                decode_split_simd(src, row + op.src2, op.nbytes, op.table, dst);
                break;
#endif
            default:
                break;
        }
    }
}

// a . b over n (a multiple of kLanes) floats in 16 fixed lanes, folded by a fixed tree.
inline float lane_dot(const float* a, const float* b, int n) {
    float lane[kLanes] = {0};
    for (int i = 0; i < n; i += kLanes)
        for (int l = 0; l < kLanes; ++l) lane[l] += a[i + l] * b[i + l];
    for (int w = kLanes / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
    return lane[0];
}

#ifdef __AVX2__
// The sum of 8 lanes by a fixed tree: lane l + lane l + 4, then 2, 1.
inline float fold8(__m256 v8) {
    const __m128 v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
    const __m128 v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
    return _mm_cvtss_f32(_mm_add_ss(v2, _mm_movehdup_ps(v2)));
}

// exp(x) of 8 floats (Cephes expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp); exactly 0 below -87.
// The scalar libm exp made the softmax 90% of an extend's time.
inline __m256 exp256(__m256 x) {
    const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2)));
}
#endif

// s[t] <- exp(s[t] - m) for t < n and 0 for n <= t < padded (a multiple of 8); returns their sum, accumulated in 8
// fixed lanes folded by a fixed tree (the zeros past n change nothing, so the sum is that of the first n terms).
inline float exp_shifted_sum(float* s, int n, int padded, float m) {
#ifdef __AVX2__
    __m256 sum = _mm256_setzero_ps();
    const __m256 mv = _mm256_set1_ps(m);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int t = 0; t < padded; t += 8) {
        const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - t), lane));
        const __m256 p = _mm256_and_ps(live, exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv)));
        _mm256_storeu_ps(s + t, p);
        sum = _mm256_add_ps(sum, p);
    }
    return fold8(sum);
#else
    float lanes[8] = {0};
    for (int t = 0; t < padded; ++t) {
        s[t] = t < n ? std::exp(s[t] - m) : 0.f;
        lanes[t % 8] += s[t];
    }
    for (int w = 4; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
    return lanes[0];
#endif
}

inline float cap_logit(float s, float cap) { return cap > 0.f ? cap * std::tanh(s / cap) : s; }

inline int64_t slot_at(const void* indices, int indices_64, int64_t i) {
    return indices_64 ? static_cast<const int64_t*>(indices)[i] : static_cast<const int32_t*>(indices)[i];
}

// The norm scales of one vector: the value part's (n) and, for prod, the QJL part's (n * gamma * qjl_scale).
__attribute__((always_inline)) inline void vector_scales(const VectorSpec& spec, const PoolView& pool, int64_t slot,
                                                         int64_t head, float* value, float* qjl) {
    if (spec.norms_per_vector == 0) {
        *value = 1.f;
        *qjl = 0.f;
        return;
    }
    *value = read_norm(spec, pool, slot, head, 0);
    *qjl = spec.norms_per_vector == 2 ? *value * read_norm(spec, pool, slot, head, 1) * spec.qjl_scale : 0.f;
}

// s[t] <- cap_logit(s[t] * scale) for lo <= t < n (entries past n are scaled too, and left for exp_shifted_sum to
// zero); returns the max over lo <= t < n (-inf when none). A max is exact in any order.
inline float scaled_max(float* s, int lo, int n, float scale, float cap) {
    if (cap > 0.f) {
        float mx = kNegInf;
        for (int t = lo; t < n; ++t) {
            s[t] = cap_logit(s[t] * scale, cap);
            mx = std::max(mx, s[t]);
        }
        return mx;
    }
#ifdef __AVX2__
    __m256 mx = _mm256_set1_ps(kNegInf);
    const __m256 sv = _mm256_set1_ps(scale), neg = _mm256_set1_ps(kNegInf);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int t = lo / 8 * 8; t < n; t += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + t), sv);
        _mm256_storeu_ps(s + t, v);
        const __m256i in_range = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - t), lane),
                                                  _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo - t - 1)));
        const __m256 live = _mm256_castsi256_ps(in_range);
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(neg, v, live));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#else
    float mx = kNegInf;
    for (int t = lo; t < n; ++t) {
        s[t] *= scale;
        mx = std::max(mx, s[t]);
    }
    return mx;
#endif
}

struct DecodeArgs {
    const float* q;
    int64_t q_row_stride;
    int64_t q_head_stride;
    const VectorSpec* ks;
    PoolView kp;
    const VectorSpec* vs;
    PoolView vp;
    const void* kv_indices;
    int indices_64;
    int kv_heads;
    int group;
    float sm_scale;
    float logit_cap;
};

// The first key position a query at position `pos` sees.
inline int64_t window_start(int64_t pos, int64_t window) { return window < 0 ? 0 : std::max<int64_t>(0, pos - window); }

// out[i] = q[i][off:off + n] . row[off:off + n] (n a multiple of 16) for NG queries: 16 lanes per dot, folded by a
// fixed tree.
template <int NG>
inline void dots16(const float* const* q, const float* row, int off, int n, float* out) {
    row += off;
#ifdef __AVX2__
    __m256 c[NG][2];
    for (int i = 0; i < NG; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
    for (int e = 0; e < n; e += 16) {
        const __m256 r0 = _mm256_loadu_ps(row + e), r1 = _mm256_loadu_ps(row + e + 8);
        for (int i = 0; i < NG; ++i) {
            c[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q[i] + off + e), r0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(q[i] + off + e + 8), r1, c[i][1]);
        }
    }
    for (int i = 0; i < NG; ++i) out[i] = fold8(_mm256_add_ps(c[i][0], c[i][1]));
#else
    for (int i = 0; i < NG; ++i) out[i] = lane_dot(q[i] + off, row, n);
#endif
}

// acc[i][e] = acc[i][e] * alpha[i] + sum_t w[i][t] * rows[t * stride + e], sequential over t, for e in [e0, e1)
// (a multiple of 16 apart) and NG queries.
template <int NG>
inline void accumulate16(float* const* acc, const float* alpha, const float* const* w, const float* rows,
                         int stride, int nt, int e0, int e1) {
    for (int e = e0; e < e1; e += 16) {
#ifdef __AVX2__
        __m256 c[NG][2];
        for (int i = 0; i < NG; ++i) {
            const __m256 a = _mm256_set1_ps(alpha[i]);
            c[i][0] = _mm256_mul_ps(_mm256_loadu_ps(acc[i] + e), a);
            c[i][1] = _mm256_mul_ps(_mm256_loadu_ps(acc[i] + e + 8), a);
        }
        for (int t = 0; t < nt; ++t) {
            const float* r = rows + static_cast<int64_t>(t) * stride + e;
            const __m256 r0 = _mm256_loadu_ps(r), r1 = _mm256_loadu_ps(r + 8);
            for (int i = 0; i < NG; ++i) {
                const __m256 wv = _mm256_set1_ps(w[i][t]);
                c[i][0] = _mm256_fmadd_ps(wv, r0, c[i][0]);
                c[i][1] = _mm256_fmadd_ps(wv, r1, c[i][1]);
            }
        }
        for (int i = 0; i < NG; ++i) {
            _mm256_storeu_ps(acc[i] + e, c[i][0]);
            _mm256_storeu_ps(acc[i] + e + 8, c[i][1]);
        }
#else
        float c[NG][16];
        for (int i = 0; i < NG; ++i)
            for (int l = 0; l < 16; ++l) c[i][l] = acc[i][e + l] * alpha[i];
        for (int t = 0; t < nt; ++t) {
            const float* r = rows + static_cast<int64_t>(t) * stride + e;
            for (int i = 0; i < NG; ++i)
                for (int l = 0; l < 16; ++l) c[i][l] += w[i][t] * r[l];
        }
        for (int i = 0; i < NG; ++i) std::memcpy(acc[i] + e, c[i], sizeof(c[i]));
#endif
    }
}

// Queries in groups of up to 4 (the accumulators of 4 fit in AVX2's 16 registers).
template <typename F>
inline void by_four(int count, F&& body) {
    for (int g0 = 0; g0 < count; g0 += 4) {
        switch (std::min(4, count - g0)) {
            case 1:
                body(g0, std::integral_constant<int, 1>{});
                break;
            case 2:
                body(g0, std::integral_constant<int, 2>{});
                break;
            case 3:
                body(g0, std::integral_constant<int, 3>{});
                break;
            default:
                body(g0, std::integral_constant<int, 4>{});
                break;
        }
    }
}

// What a decode work item keeps for its group's queries: their query and output rows, the tile's scores (turned in
// place into softmax weights p * n) and QJL weights (p * n * gamma * c_d), alpha, and the tile's norm scales.
struct GroupState {
    int G;
    std::vector<float> weights;
    std::vector<const float*> q, w, wq;
    std::vector<float*> out;
    std::vector<float> alpha;
    float scales[kDecodeTile] = {}, qjl_scales[kDecodeTile] = {};

    // Sets the online-softmax state m[g], l[g], acc[g * Ev ...] of request b, KV head h to empty.
    GroupState(const DecodeArgs& a, int64_t b, int64_t h, float* m, float* l, float* acc)
        : G(a.group), weights(static_cast<size_t>(2 * a.group) * kDecodeTile), q(G), w(G), wq(G), out(G), alpha(G) {
        const int ev = a.vs->width;
        for (int g = 0; g < G; ++g) {
            q[g] = a.q + b * a.q_row_stride + (h * G + g) * a.q_head_stride;
            w[g] = &weights[static_cast<size_t>(g) * kDecodeTile];
            wq[g] = &weights[static_cast<size_t>(G + g) * kDecodeTile];
            out[g] = acc + static_cast<size_t>(g) * ev;
            m[g] = kNegInf;
            l[g] = 0.f;
        }
        std::fill(acc, acc + static_cast<size_t>(G) * ev, 0.f);
    }

    float* scores() { return weights.data(); }

    // The softmax update of a tile of nt scored keys (scales: V's norm scales by now): m, l and alpha move on, the
    // scores become weights p * n and p * n * gamma * c_d. A max is exact in any order; the rest is per key.
    void softmax(int nt, float* m, float* l) {
        for (int g = 0; g < G; ++g) {
            float* sg = scores() + g * kDecodeTile;
            float* pq = &weights[static_cast<size_t>(G + g) * kDecodeTile];
#ifdef __AVX512F__
            static_assert(kDecodeTile == 32, "a tile's scores are two registers");
            const __mmask16 live0 = nt >= 16 ? 0xffff : (1u << nt) - 1;
            const __mmask16 live1 = nt >= 32 ? 0xffff : (1u << std::max(0, nt - 16)) - 1;
            const __m512 neg = _mm512_set1_ps(kNegInf);
            const __m512 mx =
                _mm512_max_ps(_mm512_mask_loadu_ps(neg, live0, sg), _mm512_mask_loadu_ps(neg, live1, sg + 16));
            const float m_new = std::max(m[g], _mm512_reduce_max_ps(mx));
#else
            float m_new = m[g];
            for (int t = 0; t < nt; ++t) m_new = std::max(m_new, sg[t]);
#endif
            alpha[g] = std::exp(m[g] - m_new);
            const float sum = exp_shifted_sum(sg, nt, kDecodeTile, m_new);  // zeros past nt
            for (int t = 0; t < kDecodeTile; ++t) {
                pq[t] = sg[t] * qjl_scales[t];
                sg[t] *= scales[t];
            }
            l[g] = l[g] * alpha[g] + sum;
            m[g] = m_new;
        }
    }
};

// body(slots, nt) for each tile of a work item's keys [k0, k1) in order, the next tile's code rows and norms
// prefetched before it runs.
template <typename F>
void for_each_tile(const DecodeArgs& a, int64_t h, int64_t first, int64_t k0, int64_t k1, F&& body) {
    int64_t slots[kDecodeTile], next[kDecodeTile];
    const auto load_slots = [&](int64_t t0, int64_t* dst) {
        const int nt = static_cast<int>(std::min<int64_t>(kDecodeTile, k1 - t0));
        for (int t = 0; t < nt; ++t) dst[t] = slot_at(a.kv_indices, a.indices_64, first + t0 + t);
        return nt;
    };
    if (k0 < k1) {
        const int nt = load_slots(k0, slots);
        prefetch_rows(*a.ks, a.kp, slots, nt, h);
        prefetch_rows(*a.vs, a.vp, slots, nt, h);
    }
    for (int64_t t0 = k0; t0 < k1; t0 += kDecodeTile) {
        const int nt = static_cast<int>(std::min<int64_t>(kDecodeTile, k1 - t0));
        if (t0 + kDecodeTile < k1) {  // the next tile's rows arrive while this one is computed
            const int nn = load_slots(t0 + kDecodeTile, next);
            prefetch_rows(*a.ks, a.kp, next, nn, h);
            prefetch_rows(*a.vs, a.vp, next, nn, h);
        }
        body(static_cast<const int64_t*>(slots), nt);
        std::memcpy(slots, next, sizeof(slots));
    }
}

// One decode work item: request keys [k0, k1) (positions within the request, slots from `first`), KV head h, the
// group's queries -> online-softmax state m[g], l[g], acc[g * Ev ...]. Tiles of kDecodeTile keys: K decoded, scored
// and its softmax update made, then V decoded and accumulated.
void decode_chunk(const DecodeArgs& a, int64_t b, int64_t h, int64_t first, int64_t k0, int64_t k1, float* m,
                  float* l, float* acc) {
    const VectorSpec& ks = *a.ks;
    const VectorSpec& vs = *a.vs;
    const int G = a.group, ek = ks.width, ev = vs.width, dk = ks.head_dim, dv = vs.head_dim;
    const bool k_prod = ks.norms_per_vector == 2, v_prod = vs.norms_per_vector == 2;
    std::vector<float> tile(static_cast<size_t>(kDecodeTile) * std::max(ek, ev));
    GroupState st(a, b, h, m, l, acc);
    float dots[4] = {}, qjl_dots[4] = {};
    for_each_tile(a, h, first, k0, k1, [&](const int64_t* slots, int nt) {
        // The whole tile is decoded before it is read: a row read right after narrow table stores (the non-AVX2
        // ops) stalls on store forwarding, measured 3x slower.
        for (int t = 0; t < nt; ++t) {
            decode_row(ks, code_row(a.kp, slots[t], h), &tile[static_cast<size_t>(t) * ek]);
            vector_scales(ks, a.kp, slots[t], h, &st.scales[t], &st.qjl_scales[t]);
        }
        float* scores = st.scores();
        for (int t = 0; t < nt; ++t) {
            const float* row = &tile[static_cast<size_t>(t) * ek];
            by_four(G, [&](int g0, auto ng) {
                dots16<decltype(ng)::value>(&st.q[g0], row, 0, dk, dots);
                if (k_prod) dots16<decltype(ng)::value>(&st.q[g0], row, dk, dk, qjl_dots);
                for (int i = 0; i < ng; ++i) {
                    float s = st.scales[t] * dots[i];
                    if (k_prod) s += st.qjl_scales[t] * qjl_dots[i];
                    scores[(g0 + i) * kDecodeTile + t] = cap_logit(s * a.sm_scale, a.logit_cap);
                }
            });
        }
        for (int t = 0; t < nt; ++t) vector_scales(vs, a.vp, slots[t], h, &st.scales[t], &st.qjl_scales[t]);
        st.softmax(nt, m, l);
        for (int t = 0; t < nt; ++t) decode_row(vs, code_row(a.vp, slots[t], h), &tile[static_cast<size_t>(t) * ev]);
        by_four(G, [&](int g0, auto ng) {
            constexpr int NG = decltype(ng)::value;
            accumulate16<NG>(&st.out[g0], &st.alpha[g0], &st.w[g0], tile.data(), ev, nt, 0, dv);
            if (v_prod) accumulate16<NG>(&st.out[g0], &st.alpha[g0], &st.wq[g0], tile.data(), ev, nt, dv, ev);
        });
    });
}

#ifdef __AVX512F__
// ------------------------------------------------------------------------------------ decode, AVX-512 blocks
//
// On AVX-512 builds a decode reads each code row once per pass, 16 channels at a time, straight into registers: a
// block of 16 channels is one 16-byte load widened to 16 lanes, a shift and one vpermps over the codebook (vpermps
// looks at the low 4 bits of each lane, so the tables are the codebook repeated to 16 entries and no mask is
// needed). No decoded row is stored. Keys: each block is multiplied into the group's query blocks at once (16 lanes
// per dot, blocks in channel order, then a fixed fold of the lanes). Values: 4 blocks x up to 4 queries of
// accumulators stay in registers while the tile's keys pass in order. Used when every op of both specs decodes
// this way (planes of a multiple of 16 bytes, head_dim a multiple of 64); otherwise decode_chunk runs.

constexpr int kMaxBlocks = 32;  // 16-channel blocks of a decoded row: up to 2 x 256 channels

struct Block {
    int32_t kind;  // 0: one plane field; 1: a 3-bit channel from a 2-bit and a 1-bit plane; 2: raw bfloat16
    int32_t off;   // byte offset in the row of the 16 bytes (kind 2: 32 bytes) to widen
    int32_t shift;   // right shift that brings the field to bits 0.. (kind 1: the low plane's 2 bits)
    int32_t off2;    // kind 1: the high plane's 16 bytes
    int32_t shift2;  // kind 1: right shift (negative: left) that brings the high bit to bit 2
    const float* table;  // 16 floats: the codebook repeated
};

struct BlockPlan {
    bool ok = false;
    int uniform = -1;  // the kind of every block, or -1 when they differ
    int n = 0;
    Block blocks[kMaxBlocks];
};

BlockPlan block_plan(const VectorSpec& spec) {
    BlockPlan plan;
    if (spec.zero_values || spec.head_dim % 64 != 0 || spec.width % 16 != 0 || spec.width / 16 > kMaxBlocks)
        return plan;
    plan.n = spec.width / 16;
    bool covered[kMaxBlocks] = {};
    const auto put = [&](int channel, const Block& b) {
        if (channel % 16 != 0 || channel / 16 >= plan.n || covered[channel / 16]) return false;
        covered[channel / 16] = true;
        plan.blocks[channel / 16] = b;
        return true;
    };
    for (int o = 0; o < spec.n_ops; ++o) {
        const DecodeOp& op = spec.ops[o];
        if (op.kind == 11 || op.kind == 12 || op.kind == 13) {
            const int bits = op.kind == 11 ? 4 : op.kind == 12 ? 2 : 1, per_byte = 8 / bits;
            if (op.nbytes % 16 != 0) return plan;
            for (int ch = 0; ch < op.nbytes * per_byte; ch += 16)
                if (!put(op.dst + ch, Block{0, op.src + ch % op.nbytes, ch / op.nbytes * bits, 0, 0, op.table}))
                    return plan;
        } else if (op.kind == 14) {
            const int n2 = op.nbytes, n1 = n2 / 2;
            if (n1 % 16 != 0) return plan;
            for (int ch = 0; ch < 4 * n2; ch += 16) {
                const int k = ch / n2, j = ch % n2;
                if (!put(op.dst + ch, Block{1, op.src + j, 2 * k, op.src2 + j % n1, 2 * k + j / n1 - 2, op.table}))
                    return plan;
            }
        } else if (op.kind == 5) {
            if (op.nbytes % 32 != 0) return plan;
            for (int ch = 0; ch < op.nbytes / 2; ch += 16)
                if (!put(op.dst + ch, Block{2, op.src + 2 * ch, 0, 0, 0, nullptr})) return plan;
        } else {
            return plan;
        }
    }
    for (int i = 0; i < plan.n; ++i)
        if (!covered[i]) return plan;
    plan.uniform = plan.blocks[0].kind;
    for (int i = 1; i < plan.n; ++i)
        if (plan.blocks[i].kind != plan.uniform) plan.uniform = -1;
    plan.ok = true;
    return plan;
}

inline __m512i widen16(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The 16 unscaled floats of block b of a row (KIND: b.kind, or -1 to read it).
template <int KIND>
inline __m512 decode_block(const Block& b, const uint8_t* row, __m512 table) {
    const int kind = KIND >= 0 ? KIND : b.kind;
    if (kind == 0) {
        const __m512i v = _mm512_srl_epi32(widen16(row + b.off), _mm_cvtsi32_si128(b.shift));
        return _mm512_permutexvar_ps(v, table);
    }
    if (kind == 1) {
        const __m512i low = _mm512_srl_epi32(widen16(row + b.off), _mm_cvtsi32_si128(b.shift));
        const __m512i hv = widen16(row + b.off2);
        const __m512i high = b.shift2 >= 0 ? _mm512_srl_epi32(hv, _mm_cvtsi32_si128(b.shift2))
                                           : _mm512_sll_epi32(hv, _mm_cvtsi32_si128(-b.shift2));
        // bits 0-1 from the low plane, bit 2 (and a don't-care bit 3) from the high one
        const __m512i code = _mm512_ternarylogic_epi32(_mm512_set1_epi32(3), low, high, 0xCA);
        return _mm512_permutexvar_ps(code, table);
    }
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b.off)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

inline __m512 block_table(const Block& b) { return b.table ? _mm512_loadu_ps(b.table) : _mm512_setzero_ps(); }

// The sum of 16 lanes by a fixed tree: lane l + lane l + 8, then fold8 (the tree dots16's two halves take).
inline float fold16(__m512 v) {
    return fold8(_mm256_add_ps(_mm512_castps512_ps256(v),
                               _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

// dots[u * NG + i] / qjl[u * NG + i]: query i's products with the value part (blocks below value_blocks) and the
// QJL part of key u's row, for KT keys at once (each block's descriptor and query blocks read once for them all).
template <int KIND, int NG, int KT>
__attribute__((always_inline)) inline void key_dots(const BlockPlan& plan, int value_blocks,
                                                    const uint8_t* const* rows, const float* const* q, float* dots,
                                                    float* qjl) {
    __m512 c[KT][NG];
    for (int u = 0; u < KT; ++u)
        for (int i = 0; i < NG; ++i) c[u][i] = _mm512_setzero_ps();
    int j = 0;
    const auto run = [&](int end) {
        for (; j < end; ++j) {
            const Block& b = plan.blocks[j];
            const __m512 table = block_table(b);
            __m512 qv[NG];
            for (int i = 0; i < NG; ++i) qv[i] = _mm512_loadu_ps(q[i] + 16 * j);
            for (int u = 0; u < KT; ++u) {
                const __m512 k = decode_block<KIND>(b, rows[u], table);
                for (int i = 0; i < NG; ++i) c[u][i] = _mm512_fmadd_ps(k, qv[i], c[u][i]);
            }
        }
    };
    run(value_blocks);
    for (int u = 0; u < KT; ++u)
        for (int i = 0; i < NG; ++i) {
            dots[u * NG + i] = fold16(c[u][i]);
            c[u][i] = _mm512_setzero_ps();
        }
    run(plan.n);
    for (int u = 0; u < KT; ++u)
        for (int i = 0; i < NG; ++i) qjl[u * NG + i] = value_blocks < plan.n ? fold16(c[u][i]) : 0.f;
}

// acc[i][16 j0 .. 16 (j0 + 4)) = acc * alpha[i] + sum_t w[i][t] * row_t's blocks j0 .. j0 + 3, sequential over t.
template <int KIND, int NG>
inline void value_blocks4(const BlockPlan& plan, int j0, const uint8_t* const* rows, int nt, float* const* acc,
                          const float* alpha, const float* const* w) {
    __m512 c[4][NG];
    const __m512 t0 = block_table(plan.blocks[j0]), t1 = block_table(plan.blocks[j0 + 1]);
    const __m512 t2 = block_table(plan.blocks[j0 + 2]), t3 = block_table(plan.blocks[j0 + 3]);
    const Block &b0 = plan.blocks[j0], &b1 = plan.blocks[j0 + 1], &b2 = plan.blocks[j0 + 2],
                &b3 = plan.blocks[j0 + 3];
    for (int i = 0; i < NG; ++i) {
        const __m512 a = _mm512_set1_ps(alpha[i]);
        for (int j = 0; j < 4; ++j) c[j][i] = _mm512_mul_ps(_mm512_loadu_ps(acc[i] + 16 * (j0 + j)), a);
    }
    for (int t = 0; t < nt; ++t) {
        const uint8_t* row = rows[t];
        const __m512 v0 = decode_block<KIND>(b0, row, t0), v1 = decode_block<KIND>(b1, row, t1);
        const __m512 v2 = decode_block<KIND>(b2, row, t2), v3 = decode_block<KIND>(b3, row, t3);
        for (int i = 0; i < NG; ++i) {
            const __m512 wv = _mm512_set1_ps(w[i][t]);
            c[0][i] = _mm512_fmadd_ps(wv, v0, c[0][i]);
            c[1][i] = _mm512_fmadd_ps(wv, v1, c[1][i]);
            c[2][i] = _mm512_fmadd_ps(wv, v2, c[2][i]);
            c[3][i] = _mm512_fmadd_ps(wv, v3, c[3][i]);
        }
    }
    for (int i = 0; i < NG; ++i)
        for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc[i] + 16 * (j0 + j), c[j][i]);
}

// decode_chunk on AVX-512 blocks (same work item, same state; see the section comment).
template <int KK, int VK>
void decode_chunk_blocks(const DecodeArgs& a, const BlockPlan& kplan, const BlockPlan& vplan, int64_t b, int64_t h,
                         int64_t first, int64_t k0, int64_t k1, float* m, float* l, float* acc) {
    const VectorSpec& ks = *a.ks;
    const VectorSpec& vs = *a.vs;
    const int G = a.group, kvalue_blocks = ks.head_dim / 16, vvalue_blocks = vs.head_dim / 16;
    const bool k_prod = ks.norms_per_vector == 2;
    GroupState st(a, b, h, m, l, acc);
    float dots[16], qjl_dots[16];
    const uint8_t* krows[kDecodeTile];
    const uint8_t* vrows[kDecodeTile];
    for_each_tile(a, h, first, k0, k1, [&](const int64_t* slots, int nt) {
        for (int t = 0; t < nt; ++t) {
            krows[t] = code_row(a.kp, slots[t], h);
            vrows[t] = code_row(a.vp, slots[t], h);
            vector_scales(ks, a.kp, slots[t], h, &st.scales[t], &st.qjl_scales[t]);
        }
        float* scores = st.scores();
        by_four(G, [&](int g0, auto ng) {
            constexpr int NG = decltype(ng)::value, KT = NG <= 2 ? 4 : 2;  // KT x NG accumulators: 8 registers
            const auto score = [&](int t, int kt) {
                for (int u = 0; u < kt; ++u)
                    for (int i = 0; i < NG; ++i) {
                        float s = st.scales[t + u] * dots[u * NG + i];
                        if (k_prod) s += st.qjl_scales[t + u] * qjl_dots[u * NG + i];
                        scores[(g0 + i) * kDecodeTile + t + u] = cap_logit(s * a.sm_scale, a.logit_cap);
                    }
            };
            int t = 0;
            for (; t + KT <= nt; t += KT) {
                key_dots<KK, NG, KT>(kplan, kvalue_blocks, &krows[t], &st.q[g0], dots, qjl_dots);
                score(t, KT);
            }
            for (; t < nt; ++t) {
                key_dots<KK, NG, 1>(kplan, kvalue_blocks, &krows[t], &st.q[g0], dots, qjl_dots);
                score(t, 1);
            }
        });
        for (int t = 0; t < nt; ++t) vector_scales(vs, a.vp, slots[t], h, &st.scales[t], &st.qjl_scales[t]);
        st.softmax(nt, m, l);
        by_four(G, [&](int g0, auto ng) {
            for (int j0 = 0; j0 < vplan.n; j0 += 4)
                value_blocks4<VK, decltype(ng)::value>(vplan, j0, vrows, nt, &st.out[g0], &st.alpha[g0],
                                                        j0 < vvalue_blocks ? &st.w[g0] : &st.wq[g0]);
        });
    });
}
#endif

int thread_count(int requested) { return requested > 0 ? requested : 1; }

// Decode: q (B, Hq, Ek) fp32 in K's storage basis; request b reads slots kv_indices[kv_indptr[b] : kv_indptr[b+1]],
// from its window start on (window >= 0: its last window + 1 slots); out (B, Hq, Ev) fp32 in V's storage basis,
// contiguous (zeros for a request without slots).
void decode_attention(const float* q, int64_t q_row_stride, int64_t q_head_stride, const VectorSpec* ks,
                      PoolView kp, const VectorSpec* vs, PoolView vp, const int64_t* kv_indptr,
                      const void* kv_indices, int32_t indices_64, int32_t batch, int32_t kv_heads, int32_t group,
                      float sm_scale, float logit_cap, int32_t window, float* out, int32_t num_threads) {
    const DecodeArgs args{q, q_row_stride, q_head_stride, ks, kp, vs, vp, kv_indices, indices_64, kv_heads, group,
                          sm_scale, logit_cap};
    const int ev = vs->width, G = group;
    // Work items (request, KV head, chunk), and where each request's chunks start among them: chunks at fixed
    // positions (multiples of kDecodeChunk), from the one holding the window start.
    std::vector<int64_t> chunk_base(static_cast<size_t>(batch) + 1, 0), first_chunk(static_cast<size_t>(batch), 0);
    for (int b = 0; b < batch; ++b) {
        const int64_t len = kv_indptr[b + 1] - kv_indptr[b];
        first_chunk[b] = len > 0 ? window_start(len - 1, window) / kDecodeChunk : 0;
        chunk_base[b + 1] = chunk_base[b] + (len + kDecodeChunk - 1) / kDecodeChunk - first_chunk[b];
    }
    const int64_t chunks = chunk_base[batch];
    const int64_t items = chunks * kv_heads;
    std::vector<float> part_m(static_cast<size_t>(items) * G), part_l(static_cast<size_t>(items) * G);
    std::vector<float> part_acc(static_cast<size_t>(items) * G * ev);
    std::vector<int32_t> item_request(static_cast<size_t>(chunks));
    for (int b = 0; b < batch; ++b)
        for (int64_t c = chunk_base[b]; c < chunk_base[b + 1]; ++c) item_request[c] = b;
    const int threads = thread_count(num_threads);
#ifdef __AVX512F__
    const BlockPlan kplan = block_plan(*ks), vplan = block_plan(*vs);
    const bool blocks = kplan.ok && vplan.ok;
    // the kinds the block decoders are specialised on: one plane's field, a split 3-bit channel, or mixed
    const int kk = kplan.uniform == 0 || kplan.uniform == 1 ? kplan.uniform : -1;
    const int vk = vplan.uniform == 0 || vplan.uniform == 1 ? vplan.uniform : -1;
    using ChunkFn = void (*)(const DecodeArgs&, const BlockPlan&, const BlockPlan&, int64_t, int64_t, int64_t,
                             int64_t, int64_t, float*, float*, float*);
    static constexpr ChunkFn kChunkFns[3][3] = {
        {decode_chunk_blocks<-1, -1>, decode_chunk_blocks<-1, 0>, decode_chunk_blocks<-1, 1>},
        {decode_chunk_blocks<0, -1>, decode_chunk_blocks<0, 0>, decode_chunk_blocks<0, 1>},
        {decode_chunk_blocks<1, -1>, decode_chunk_blocks<1, 0>, decode_chunk_blocks<1, 1>},
    };
    const ChunkFn chunk_fn = kChunkFns[kk + 1][vk + 1];
#endif
    // One parallel region for both phases (the merge after the implicit barrier): a fork and join per call, not
    // two, since a join waits for the slowest thread and on a busy machine that thread may be descheduled.
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t c = item / kv_heads, h = item % kv_heads;
        const int b = item_request[c];
        const int64_t len = kv_indptr[b + 1] - kv_indptr[b];
        const int64_t c0 = (c - chunk_base[b] + first_chunk[b]) * kDecodeChunk;
        const int64_t k0 = std::max(c0, window_start(len - 1, window)), k1 = std::min(len, c0 + kDecodeChunk);
#ifdef __AVX512F__
        if (blocks) {
            chunk_fn(args, kplan, vplan, b, h, kv_indptr[b], k0, k1, &part_m[item * G], &part_l[item * G],
                     &part_acc[static_cast<size_t>(item) * G * ev]);
            continue;
        }
#endif
        decode_chunk(args, b, h, kv_indptr[b], k0, k1, &part_m[item * G], &part_l[item * G],
                     &part_acc[static_cast<size_t>(item) * G * ev]);
    }
    // Fold each (request, head, query)'s chunks left to right, then normalise.
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < static_cast<int64_t>(batch) * kv_heads; ++bh) {
        const int b = static_cast<int>(bh / kv_heads);
        const int64_t h = bh % kv_heads;
        for (int g = 0; g < G; ++g) {
            float* o = out + (static_cast<int64_t>(b) * kv_heads * G + h * G + g) * ev;
            if (chunk_base[b + 1] == chunk_base[b]) {
                std::fill(o, o + ev, 0.f);
                continue;
            }
            const int64_t first = (chunk_base[b] * kv_heads + h) * G + g;
            float m = part_m[first], l = part_l[first];
            std::memcpy(o, &part_acc[first * ev], sizeof(float) * ev);
            for (int64_t c = chunk_base[b] + 1; c < chunk_base[b + 1]; ++c) {
                const int64_t at = (c * kv_heads + h) * G + g;
                const float m_new = std::max(m, part_m[at]);
                const float alpha = std::exp(m - m_new), beta = std::exp(part_m[at] - m_new);
                l = l * alpha + part_l[at] * beta;
                const float* pa = &part_acc[at * ev];
                for (int e = 0; e < ev; ++e) o[e] = o[e] * alpha + pa[e] * beta;
                m = m_new;
            }
            const float inv = 1.f / l;
            for (int e = 0; e < ev; ++e) o[e] *= inv;
        }
    }
    }
}

}  // namespace

namespace {

struct ExtendArgs {
    const float* q;
    int64_t q_row_stride;
    int64_t q_head_stride;
    const VectorSpec* ks;
    PoolView kp;
    const VectorSpec* vs;
    PoolView vp;
    const void* kv_indices;
    int indices_64;
    int kv_heads;
    int group;
    float sm_scale;
    float logit_cap;
    int64_t window;
    float* out;
};

// Decode keys [k0 + t0, k0 + nt) of a request into a transposed tile kt[e * kExtendTile + t], norms applied;
// columns before t0 (outside every row's window: never read) and from nt on are zero.
void key_tile(const ExtendArgs& a, int64_t first, int64_t h, int64_t k0, int t0, int nt, float* row, float* kt) {
    const VectorSpec& ks = *a.ks;
    const int ek = ks.width, dk = ks.head_dim;
    for (int e = 0; e < ek; ++e)
        for (int t = 0; t < t0; ++t) kt[e * kExtendTile + t] = 0.f;
    for (int t = t0; t < nt; ++t) {
        const int64_t slot = slot_at(a.kv_indices, a.indices_64, first + k0 + t);
        float n, nq;
        vector_scales(ks, a.kp, slot, h, &n, &nq);
        decode_row(ks, code_row(a.kp, slot, h), row);
        for (int e = 0; e < dk; ++e) kt[e * kExtendTile + t] = n * row[e];
        for (int e = dk; e < ek; ++e) kt[e * kExtendTile + t] = nq * row[e];
    }
    for (int e = 0; e < ek; ++e)
        for (int t = nt; t < kExtendTile; ++t) kt[e * kExtendTile + t] = 0.f;
}

// Decode values [k0 + t0, k0 + nt) into rows vt[t * Ev + e], norms applied; rows before t0 and from nt on are zero.
void value_tile(const ExtendArgs& a, int64_t first, int64_t h, int64_t k0, int t0, int nt, float* vt) {
    const VectorSpec& vs = *a.vs;
    const int ev = vs.width, dv = vs.head_dim;
    std::fill(vt, vt + static_cast<int64_t>(t0) * ev, 0.f);
    for (int t = t0; t < nt; ++t) {
        const int64_t slot = slot_at(a.kv_indices, a.indices_64, first + k0 + t);
        float n, nq;
        vector_scales(vs, a.vp, slot, h, &n, &nq);
        float* r = vt + static_cast<int64_t>(t) * ev;
        decode_row(vs, code_row(a.vp, slot, h), r);
        for (int e = 0; e < dv; ++e) r[e] *= n;
        for (int e = dv; e < ev; ++e) r[e] *= nq;
    }
    std::fill(vt + static_cast<int64_t>(nt) * ev, vt + static_cast<int64_t>(kExtendTile) * ev, 0.f);
}

// s[r][t] = sum_e q[r][e] * kt[e][t], each a sequential sum over e; rows in blocks of 4, keys in blocks of 16.
void tile_scores(const float* qb, int rows, int ek, const float* kt, float* s) {
#ifdef __AVX512F__
    // 4 rows x the whole tile (4 x 16 keys): 16 accumulators, the tile (ek x 64 floats) stays in L1 for every row
    // block. Each accumulator lane is one (row, key) summed over e in order: the same sums as the AVX2 path.
    static_assert(kExtendTile == 64, "the AVX-512 micro-kernel covers a tile in four registers");
    for (int r0 = 0; r0 < rows; r0 += 4) {
        __m512 c[4][4];
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) c[i][j] = _mm512_setzero_ps();
        const float* q0 = qb + r0 * ek;
        for (int e = 0; e < ek; ++e) {
            const float* k = kt + e * kExtendTile;
            __m512 k0 = _mm512_loadu_ps(k), k1 = _mm512_loadu_ps(k + 16);
            __m512 k2 = _mm512_loadu_ps(k + 32), k3 = _mm512_loadu_ps(k + 48);
            asm("" : "+v"(k0), "+v"(k1), "+v"(k2), "+v"(k3));  // keep the tile row in registers: one load each
            for (int i = 0; i < 4; ++i) {
                const __m512 qv = _mm512_set1_ps(q0[i * ek + e]);
                c[i][0] = _mm512_fmadd_ps(qv, k0, c[i][0]);
                c[i][1] = _mm512_fmadd_ps(qv, k1, c[i][1]);
                c[i][2] = _mm512_fmadd_ps(qv, k2, c[i][2]);
                c[i][3] = _mm512_fmadd_ps(qv, k3, c[i][3]);
            }
        }
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) _mm512_storeu_ps(s + (r0 + i) * kExtendTile + 16 * j, c[i][j]);
    }
    return;
#endif
    // Key blocks outer: one block's column of the tile (ek x 16 floats) stays in L1 while every row passes.
    for (int t0 = 0; t0 < kExtendTile; t0 += 16) {
        for (int r0 = 0; r0 < rows; r0 += 4) {
#ifdef __AVX2__
            __m256 c[4][2];
            for (int i = 0; i < 4; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
            for (int e = 0; e < ek; ++e) {
                const float* k = kt + e * kExtendTile + t0;
                __m256 k0 = _mm256_loadu_ps(k), k1 = _mm256_loadu_ps(k + 8);
                asm("" : "+x"(k0), "+x"(k1));  // one load each, not one per row folded into the FMAs
                for (int i = 0; i < 4; ++i) {
                    const __m256 qv = _mm256_broadcast_ss(qb + (r0 + i) * ek + e);
                    c[i][0] = _mm256_fmadd_ps(qv, k0, c[i][0]);
                    c[i][1] = _mm256_fmadd_ps(qv, k1, c[i][1]);
                }
            }
            for (int i = 0; i < 4; ++i) {
                _mm256_storeu_ps(s + (r0 + i) * kExtendTile + t0, c[i][0]);
                _mm256_storeu_ps(s + (r0 + i) * kExtendTile + t0 + 8, c[i][1]);
            }
#else
            float c[4][16] = {};
            for (int e = 0; e < ek; ++e) {
                const float* k = kt + e * kExtendTile + t0;
                for (int i = 0; i < 4; ++i) {
                    const float qv = qb[(r0 + i) * ek + e];
                    for (int t = 0; t < 16; ++t) c[i][t] += qv * k[t];
                }
            }
            for (int i = 0; i < 4; ++i) std::memcpy(s + (r0 + i) * kExtendTile + t0, c[i], sizeof(c[i]));
#endif
        }
    }
}

// acc[r][e] = acc[r][e] * alpha[r] + sum_t p[r][t] * vt[t][e], sequential over t.
void tile_values(const float* p, const float* alpha, int rows, int ev, const float* vt, float* acc) {
#ifdef __AVX512F__
    // 4 rows x 64 columns: 16 accumulators; each lane is one (row, e) summed over t in order, as the AVX2 path.
    if (ev % 64 == 0) {
        for (int e0 = 0; e0 < ev; e0 += 64) {
            for (int r0 = 0; r0 < rows; r0 += 4) {
                __m512 c[4][4];
                for (int i = 0; i < 4; ++i) {
                    const __m512 a = _mm512_set1_ps(alpha[r0 + i]);
                    for (int j = 0; j < 4; ++j)
                        c[i][j] = _mm512_mul_ps(_mm512_loadu_ps(acc + (r0 + i) * ev + e0 + 16 * j), a);
                }
                const float* p0 = p + r0 * kExtendTile;
                for (int t = 0; t < kExtendTile; ++t) {
                    const float* v = vt + static_cast<int64_t>(t) * ev + e0;
                    __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
                    __m512 v2 = _mm512_loadu_ps(v + 32), v3 = _mm512_loadu_ps(v + 48);
                    asm("" : "+v"(v0), "+v"(v1), "+v"(v2), "+v"(v3));  // one load per tile row, as above
                    for (int i = 0; i < 4; ++i) {
                        const __m512 pv = _mm512_set1_ps(p0[i * kExtendTile + t]);
                        c[i][0] = _mm512_fmadd_ps(pv, v0, c[i][0]);
                        c[i][1] = _mm512_fmadd_ps(pv, v1, c[i][1]);
                        c[i][2] = _mm512_fmadd_ps(pv, v2, c[i][2]);
                        c[i][3] = _mm512_fmadd_ps(pv, v3, c[i][3]);
                    }
                }
                for (int i = 0; i < 4; ++i)
                    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + (r0 + i) * ev + e0 + 16 * j, c[i][j]);
            }
        }
        return;
    }
#endif
    for (int e0 = 0; e0 < ev; e0 += 16) {  // one 16-wide column of the value tile stays in L1 for every row
        for (int r0 = 0; r0 < rows; r0 += 4) {
#ifdef __AVX2__
            __m256 c[4][2];
            for (int i = 0; i < 4; ++i) {
                const __m256 a = _mm256_set1_ps(alpha[r0 + i]);
                c[i][0] = _mm256_mul_ps(_mm256_loadu_ps(acc + (r0 + i) * ev + e0), a);
                c[i][1] = _mm256_mul_ps(_mm256_loadu_ps(acc + (r0 + i) * ev + e0 + 8), a);
            }
            for (int t = 0; t < kExtendTile; ++t) {
                const float* v = vt + static_cast<int64_t>(t) * ev + e0;
                __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
                asm("" : "+x"(v0), "+x"(v1));
                for (int i = 0; i < 4; ++i) {
                    const __m256 pv = _mm256_broadcast_ss(p + (r0 + i) * kExtendTile + t);
                    c[i][0] = _mm256_fmadd_ps(pv, v0, c[i][0]);
                    c[i][1] = _mm256_fmadd_ps(pv, v1, c[i][1]);
                }
            }
            for (int i = 0; i < 4; ++i) {
                _mm256_storeu_ps(acc + (r0 + i) * ev + e0, c[i][0]);
                _mm256_storeu_ps(acc + (r0 + i) * ev + e0 + 8, c[i][1]);
            }
#else
            float c[4][16];
            for (int i = 0; i < 4; ++i)
                for (int e = 0; e < 16; ++e) c[i][e] = acc[(r0 + i) * ev + e0 + e] * alpha[r0 + i];
            for (int t = 0; t < kExtendTile; ++t) {
                const float* v = vt + static_cast<int64_t>(t) * ev + e0;
                for (int i = 0; i < 4; ++i) {
                    const float pv = p[(r0 + i) * kExtendTile + t];
                    for (int e = 0; e < 16; ++e) c[i][e] += pv * v[e];
                }
            }
            for (int i = 0; i < 4; ++i) std::memcpy(acc + (r0 + i) * ev + e0, c[i], sizeof(c[i]));
#endif
        }
    }
}

// One extend work item: tokens [i0, i0 + nq) of request b (rows q_first + i), their first position `pos0`, over
// the request's keys from its slot list at `first`, KV head h.
void extend_block(const ExtendArgs& a, int64_t q_first, int64_t i0, int nq, int64_t pos0, int64_t first, int64_t h) {
    const VectorSpec& ks = *a.ks;
    const VectorSpec& vs = *a.vs;
    const int G = a.group, ek = ks.width, ev = vs.width;
    const int rows = nq * G, padded = (rows + 3) / 4 * 4;
    std::vector<float> qb(static_cast<size_t>(padded) * ek, 0.f), s(static_cast<size_t>(padded) * kExtendTile);
    std::vector<float> kt(static_cast<size_t>(ek) * kExtendTile), vt(static_cast<size_t>(kExtendTile) * ev);
    std::vector<float> acc(static_cast<size_t>(padded) * ev, 0.f), row(std::max(ek, ev));
    std::vector<float> m(padded, kNegInf), l(padded, 0.f), alpha(padded, 1.f);
    std::vector<int64_t> pos(padded, -1);
    for (int i = 0; i < nq; ++i) {
        const float* src = a.q + (q_first + i0 + i) * a.q_row_stride + h * G * a.q_head_stride;
        for (int g = 0; g < G; ++g) {
            std::memcpy(&qb[static_cast<size_t>(i * G + g) * ek], src + g * a.q_head_stride, sizeof(float) * ek);
            pos[i * G + g] = pos0 + i;
        }
    }
    const int64_t last = pos0 + nq - 1;
    const int64_t lowest = window_start(pos0, a.window);  // no row of the block sees a key below it
    for (int64_t k0 = lowest / kExtendTile * kExtendTile; k0 <= last; k0 += kExtendTile) {
        const int nt = static_cast<int>(std::min<int64_t>(kExtendTile, last + 1 - k0));
        if (k0 + kExtendTile <= last) {
            int64_t upcoming[kExtendTile];
            const int nn = static_cast<int>(std::min<int64_t>(kExtendTile, last + 1 - k0 - kExtendTile));
            for (int t = 0; t < nn; ++t) upcoming[t] = slot_at(a.kv_indices, a.indices_64, first + k0 + kExtendTile + t);
            prefetch_rows(ks, a.kp, upcoming, nn, h);
            prefetch_rows(vs, a.vp, upcoming, nn, h);
        }
        const int t0 = static_cast<int>(std::max<int64_t>(0, lowest - k0));
        key_tile(a, first, h, k0, t0, nt, row.data(), kt.data());
        tile_scores(qb.data(), padded, ek, kt.data(), s.data());
        for (int r = 0; r < padded; ++r) {
            float* sr = s.data() + r * kExtendTile;
            // the row's keys in this tile: [from, visible)
            const int visible = static_cast<int>(std::clamp<int64_t>(pos[r] - k0 + 1, 0, nt));
            const int64_t row_start = pos[r] < 0 ? 0 : window_start(pos[r], a.window);
            const int from = static_cast<int>(std::clamp<int64_t>(row_start - k0, 0, nt));
            if (visible <= from) {  // nothing to see in this tile: the row's state stays exactly as it is
                alpha[r] = 1.f;
                std::fill(sr, sr + kExtendTile, 0.f);
                continue;
            }
            const float m_new = std::max(m[r], scaled_max(sr, from, visible, a.sm_scale, a.logit_cap));
            std::fill(sr, sr + from, kNegInf);  // exp(-inf) = 0: no weight
            alpha[r] = std::exp(m[r] - m_new);
            l[r] = l[r] * alpha[r] + exp_shifted_sum(sr, visible, kExtendTile, m_new);
            m[r] = m_new;
        }
        value_tile(a, first, h, k0, t0, nt, vt.data());
        tile_values(s.data(), alpha.data(), padded, ev, vt.data(), acc.data());
    }
    for (int r = 0; r < rows; ++r) {
        const int i = r / G, g = r % G;
        float* o = a.out + ((q_first + i0 + i) * a.kv_heads * G + h * G + g) * ev;
        const float inv = 1.f / l[r];
        for (int e = 0; e < ev; ++e) o[e] = acc[static_cast<size_t>(r) * ev + e] * inv;
    }
}

// Extend: q (T, Hq, Ek) fp32 in K's storage basis; request b owns rows qo_indptr[b] : qo_indptr[b+1], its last
// tokens, and slots kv_indices[kv_indptr[b] : kv_indptr[b+1]] (prefix, then its new tokens, already written); row i
// of request b sees the keys at positions p - window .. p (window >= 0; else 0 .. p), p = (its kv length - its new
// tokens) + i. out (T, Hq, Ev) fp32 in V's storage basis, contiguous; rows of requests without slots are left as
// they are.
void extend_attention(const float* q, int64_t q_row_stride, int64_t q_head_stride, const VectorSpec* ks,
                      PoolView kp, const VectorSpec* vs, PoolView vp, const int64_t* qo_indptr,
                      const int64_t* kv_indptr, const void* kv_indices, int32_t indices_64, int32_t batch,
                      int32_t kv_heads, int32_t group, float sm_scale, float logit_cap, int32_t window,
                      float* out, int32_t num_threads) {
    const ExtendArgs args{q, q_row_stride, q_head_stride, ks, kp, vs, vp, kv_indices, indices_64, kv_heads, group,
                          sm_scale, logit_cap, window, out};
    const int tokens_per_item = std::max(1, kExtendRows / group);
    std::vector<int64_t> item_request, item_first_token;
    for (int b = 0; b < batch; ++b) {
        const int64_t n_new = qo_indptr[b + 1] - qo_indptr[b];
        if (kv_indptr[b + 1] == kv_indptr[b]) continue;
        for (int64_t i0 = 0; i0 < n_new; i0 += tokens_per_item) {
            item_request.push_back(b);
            item_first_token.push_back(i0);
        }
    }
    const int64_t items = static_cast<int64_t>(item_request.size()) * kv_heads;
    const int threads = thread_count(num_threads);
    // Items in reverse: a request's last query blocks see the most keys, and going first they balance the threads.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t it = items - 1; it >= 0; --it) {
        const int64_t block = it / kv_heads, h = it % kv_heads;
        const int64_t b = item_request[block], i0 = item_first_token[block];
        const int64_t n_new = qo_indptr[b + 1] - qo_indptr[b], n_kv = kv_indptr[b + 1] - kv_indptr[b];
        const int nq = static_cast<int>(std::min<int64_t>(tokens_per_item, n_new - i0));
        extend_block(args, qo_indptr[b], i0, nq, n_kv - n_new + i0, kv_indptr[b], h);
    }
}

// o (n) = x (k) @ w (k, n), each entry a sequential sum over k (in blocks of 64 columns): the basis changes of
// queries and outputs, bitwise independent of the batch and the thread count (a BLAS matmul picks its kernel and
// split by the shapes and threads it is given). n must be a multiple of 16.
inline void matmul_row(const float* xr, int k, const float* w, int n, float* o) {
    for (int j0 = 0; j0 < n; j0 += 64) {
        const int width = std::min(64, n - j0);
        float c[64] = {};
        for (int i = 0; i < k; ++i) {
            const float xv = xr[i];
            const float* wr = w + static_cast<int64_t>(i) * n + j0;
            for (int j = 0; j < width; ++j) c[j] += xv * wr[j];
        }
        std::memcpy(o + j0, c, sizeof(float) * width);
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------- write
//
// Quantize-and-pack of new K or V vectors straight into their pool slots (TurboQuant Algorithms 1 and 2; the
// semantics of reference.write_kv), one vector at a time in a fixed order, so that a vector's record depends on that
// vector alone (not on the batch, the thread count or the vector width):
//   x (bf16 or f32) -> float; s = 2^-e (e: frexp exponent of max |x_j|, clamped to [-126, 126]); xs = s x (exact)
//   ss = sum_j xs_j^2 (sequentially over j); n = sqrt(ss) / s; u = xs / max(sqrt(ss), 1e-30)
//   y_j = sum_i u_i R[j, i]        (R^T given; for each j the products are added in the order i = 0, 1, ...)
//   idx_j = #{boundaries < y_j}    (torch.bucketize, right=False: a tie takes the lower code)
//   planes: field k of byte b of a plane is its channel start + k * nbytes + b, (idx >> shift) & mask
//   prod: r = y - c[idx], sign bit j = (sum_i r_i S[j, i] >= 0), gamma = ||r||
//   norms: n (or n / ||c[idx]|| with norm correction), saturated at the norm dtype's largest finite value
// The sums run in another order than torch's, so a y_j within rounding of a boundary may take the neighbouring code
// (kernels/write_budget.py holds writes to that budget, as it holds the Triton write).

extern "C" {

struct EncodePlane {
    int32_t offset;
    int32_t bits;
    int32_t shift;
    int32_t nbytes;
};

struct EncodeSegment {
    int32_t start;
    int32_t channels;
    int32_t bits;
    int32_t n_planes;
    float boundaries[15];
    float centroids[16];
    EncodePlane planes[2];
};

// One VectorLayout as the write needs it; the matrices are (head_dim, head_dim) fp32, row-major.
struct EncodeSpec {
    int32_t head_dim;
    int32_t code_bytes;
    int32_t raw;  // the code row is the bfloat16 vector
    int32_t n_segments;
    int32_t prod;
    int32_t qjl_offset;
    int32_t norms_per_vector;
    int32_t norm_is_f32;
    int32_t norm_correction;
    float norm_limit;
    const float* rotation_t;  // R^T
    const float* qjl_t;       // S^T (prod only)
    EncodeSegment segments[2];
};

// A pool tensor pair as the write fills it (the same strides as PoolView).
struct MutablePoolView {
    uint8_t* codes;
    int64_t code_slot_stride;
    int64_t code_head_stride;
    void* norms;
    int64_t norm_slot_stride;
    int64_t norm_head_stride;
};

}  // extern "C"

namespace {

inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

// Round to nearest even, as torch's float -> bfloat16 (a NaN stays a quiet NaN).
inline uint16_t float_to_bf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
    return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Round to nearest even, as torch's float -> float16, subnormals and overflow to inf included.
inline uint16_t float_to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, absx = x & 0x7fffffffu;
    if (absx > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
    if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (absx < 0x38800000u) {                                               // below 2^-14: a subnormal half
        if (absx < 0x33000000u) return static_cast<uint16_t>(sign);         // below 2^-25 (a tie at it: to 0)
        const uint32_t e = absx >> 23, m = (absx & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;  // 14 .. 24: value / 2^-24 = m / 2^shift
        uint32_t h = m >> shift;
        const uint32_t rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (h & 1u))) ++h;
        return static_cast<uint16_t>(sign | h);
    }
    const uint32_t r = absx - 0x38000000u;  // exponent rebiased from 127 to 15
    uint32_t h = r >> 13;
    const uint32_t rest = r & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is still right
    return static_cast<uint16_t>(sign | h);
}

// The power of two 2^-e of quantizer.power_of_two_scale: e = frexp exponent of amax, clamped to [-126, 126].
inline float power_of_two_scale(float amax) {
    uint32_t bits;
    std::memcpy(&bits, &amax, 4);
    int32_t exponent = static_cast<int32_t>((bits >> 23) & 0xffu) - 126;
    exponent = std::min(126, std::max(-126, exponent));
    const uint32_t out_bits = static_cast<uint32_t>(127 - exponent) << 23;
    float out;
    std::memcpy(&out, &out_bits, 4);
    return out;
}

// y = x @ m for a (d, d) row-major m: y_j accumulates x_i m[i, j] for i = 0, 1, ... (vectorised over j only).
inline void rotate_row(const float* x, const float* m, int d, float* y) {
    std::fill(y, y + d, 0.f);
    for (int i = 0; i < d; ++i) {
        const float xi = x[i];
        const float* mi = m + static_cast<int64_t>(i) * d;
        for (int j = 0; j < d; ++j) y[j] += xi * mi[j];
    }
}

inline void store_norm(const EncodeSpec& spec, const MutablePoolView& pool, int64_t slot, int64_t head, int which,
                       float value) {
    const int64_t at = slot * pool.norm_slot_stride + head * pool.norm_head_stride + which;
    if (spec.norm_is_f32)
        static_cast<float*>(pool.norms)[at] = value;
    else
        static_cast<uint16_t*>(pool.norms)[at] = float_to_half(value);
}

// Quantize one vector x (d floats) into the record at (slot, head); returns 1 when its norm was saturated.
int encode_vector(const EncodeSpec& spec, const float* x, const MutablePoolView& pool, int64_t slot, int64_t head) {
    const int d = spec.head_dim;
    uint8_t* row = pool.codes + slot * pool.code_slot_stride + head * pool.code_head_stride;
    float xs[512], y[512], approx[512];
    float amax = 0.f;
    for (int j = 0; j < d; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float scale = power_of_two_scale(amax);
    float ss = 0.f;
    for (int j = 0; j < d; ++j) {
        xs[j] = x[j] * scale;
        ss += xs[j] * xs[j];
    }
    const float norm_s = std::sqrt(ss);
    const float norm = norm_s / scale;  // inf beyond float range: saturated below
    const float inv = std::max(norm_s, 1e-30f);
    for (int j = 0; j < d; ++j) xs[j] = xs[j] / inv;
    rotate_row(xs, spec.rotation_t, d, y);
    std::memset(row, 0, static_cast<size_t>(spec.code_bytes));
    for (int s = 0; s < spec.n_segments; ++s) {
        const EncodeSegment& seg = spec.segments[s];
        const int levels = (1 << seg.bits) - 1;
        uint8_t codes[512];
        for (int c = 0; c < seg.channels; ++c) {
            const float v = y[seg.start + c];
            int code = 0;
            for (int b = 0; b < levels; ++b) code += seg.boundaries[b] < v;
            codes[c] = static_cast<uint8_t>(code);
            approx[seg.start + c] = seg.centroids[code];
        }
        for (int p = 0; p < seg.n_planes; ++p) {
            const EncodePlane& plane = seg.planes[p];
            const int per_byte = 8 / plane.bits, mask = (1 << plane.bits) - 1;
            uint8_t* out = row + plane.offset;
            for (int b = 0; b < plane.nbytes; ++b) {
                int byte = 0;
                for (int k = 0; k < per_byte; ++k)
                    byte |= ((codes[k * plane.nbytes + b] >> plane.shift) & mask) << (k * plane.bits);
                out[b] = static_cast<uint8_t>(byte);
            }
        }
    }
    if (spec.prod && spec.n_segments == 0) std::fill(approx, approx + d, 0.f);
    float stored = norm;
    if (spec.norm_correction) {
        float css = 0.f;
        for (int j = 0; j < d; ++j) css += approx[j] * approx[j];
        stored = norm / std::max(std::sqrt(css), 1e-30f);
    }
    const int saturated = stored > spec.norm_limit;
    if (saturated) stored = spec.norm_limit;
    store_norm(spec, pool, slot, head, 0, stored);
    if (spec.prod) {
        float residual[512], projected[512];
        float rss = 0.f;
        for (int j = 0; j < d; ++j) {
            residual[j] = y[j] - approx[j];
            rss += residual[j] * residual[j];
        }
        rotate_row(residual, spec.qjl_t, d, projected);
        uint8_t* signs = row + spec.qjl_offset;
        const int nbytes = d / 8;
        for (int b = 0; b < nbytes; ++b) {
            int byte = 0;
            for (int k = 0; k < 8; ++k) byte |= (projected[k * nbytes + b] >= 0.f) << k;
            signs[b] = static_cast<uint8_t>(byte);
        }
        store_norm(spec, pool, slot, head, 1, std::sqrt(rss));
    }
    return saturated;
}

}  // namespace

extern "C" {

// Write x (tokens, heads, head_dim) -- bfloat16 (x_is_bf16) or float32, head_dim contiguous -- into pool slots
// loc[t] (int32 or int64). Every slot is checked against num_slots before anything is written: returns -1 (and
// writes nothing) if one is out of range, else 0. *saturated (if not null) gains the number of saturated norms.
int tq_write_vectors(const EncodeSpec* spec, MutablePoolView pool, int64_t num_slots, const void* x, int32_t x_is_bf16,
                     int64_t x_token_stride, int64_t x_head_stride, int64_t tokens, int32_t heads, const void* loc,
                     int32_t loc_64, int64_t* saturated, int32_t num_threads) {
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t slot = slot_at(loc, loc_64, t);
        if (slot < 0 || slot >= num_slots) return -1;
    }
    const int d = spec->head_dim;
    const int64_t items = tokens * heads;
    int64_t count = 0;
#pragma omp parallel for schedule(static) num_threads(thread_count(num_threads)) reduction(+ : count)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t t = item / heads, h = item % heads;
        const int64_t slot = slot_at(loc, loc_64, t);
        const int64_t at = t * x_token_stride + h * x_head_stride;
        if (spec->raw) {
            uint16_t* out = reinterpret_cast<uint16_t*>(pool.codes + slot * pool.code_slot_stride +
                                                        h * pool.code_head_stride);
            if (x_is_bf16)
                std::memcpy(out, static_cast<const uint16_t*>(x) + at, sizeof(uint16_t) * d);
            else
                for (int j = 0; j < d; ++j) out[j] = float_to_bf16(static_cast<const float*>(x)[at + j]);
            continue;
        }
        float row[512];
        if (x_is_bf16)
            for (int j = 0; j < d; ++j) row[j] = bf16_to_float(static_cast<const uint16_t*>(x)[at + j]);
        else
            std::memcpy(row, static_cast<const float*>(x) + at, sizeof(float) * d);
        count += encode_vector(*spec, row, pool, slot, h);
    }
    if (saturated) *saturated += count;
    return 0;
}

}  // extern "C"

// ------------------------------------------------------------------------------------------------ entry points
//
// Decode and extend from the caller's tensors: the query (bfloat16 or float32) is turned into K's storage basis and
// the output out of V's here, by the fixed-order row products of matmul_row, and every index is checked first, so
// that a call costs one crossing from Python (at short context, the checks and basis changes done as separate torch
// calls cost more than the attention itself).

namespace {

// Error codes of the entry points (cpu_attention.py turns them into exceptions naming the argument).
constexpr int kBadIndptr = -1;     // kv_indptr / qo_indptr negative or decreasing
constexpr int kIndptrOverrun = -2;  // kv_indptr ends past kv_indices
constexpr int kBadSlot = -3;        // a slot index outside the pool
constexpr int kBadExtend = -4;      // qo_indptr does not end at the query rows, or a request has fewer slots than new tokens

int read_indptr(const void* indptr, int indptr_64, int64_t entries, std::vector<int64_t>& out) {
    out.resize(static_cast<size_t>(entries));
    for (int64_t i = 0; i < entries; ++i) {
        out[i] = slot_at(indptr, indptr_64, i);
        if (out[i] < 0 || (i > 0 && out[i] < out[i - 1])) return kBadIndptr;
    }
    return 0;
}

int check_kv(const std::vector<int64_t>& indptr, const void* indices, int indices_64, int64_t n_indices,
             int64_t num_slots) {
    if (indptr.back() > n_indices) return kIndptrOverrun;
    for (int64_t i = indptr.front(); i < indptr.back(); ++i) {
        const int64_t slot = slot_at(indices, indices_64, i);
        if (slot < 0 || slot >= num_slots) return kBadSlot;
    }
    return 0;
}

// rows of x (bfloat16 or float32, head_dim contiguous, (rows / heads, heads) strided) @ w (k, n) -> dense fp32.
void query_basis(const void* q, int q_is_bf16, int64_t row_stride, int64_t head_stride, int64_t rows, int heads, int k,
                 const float* w, int n, float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        float x[512];
        const int64_t at = (r / heads) * row_stride + (r % heads) * head_stride;
        if (q_is_bf16)
            for (int i = 0; i < k; ++i) x[i] = bf16_to_float(static_cast<const uint16_t*>(q)[at + i]);
        else
            std::memcpy(x, static_cast<const float*>(q) + at, sizeof(float) * k);
        matmul_row(x, k, w, n, out + r * n);
    }
}

// acc (rows, k) @ w (k, n) -> out (rows, n) contiguous, bfloat16 (rounded to nearest even) or float32.
void output_basis(const float* acc, int64_t rows, int k, const float* w, int n, void* out, int out_is_bf16,
                  int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        float y[512];
        matmul_row(acc + r * k, k, w, n, y);
        if (out_is_bf16)
            for (int j = 0; j < n; ++j) static_cast<uint16_t*>(out)[r * n + j] = float_to_bf16(y[j]);
        else
            std::memcpy(static_cast<float*>(out) + r * n, y, sizeof(float) * n);
    }
}

}  // namespace

extern "C" {

// One new token per request: q (B, Hq, d) -> out (B, Hq, d) contiguous, both bfloat16 (io_is_bf16) or float32.
// Request b reads slots kv_indices[kv_indptr[b] : kv_indptr[b + 1]] (from its window start on, window >= 0). Runs on
// num_threads threads where it reads at least parallel_min_keys (key, KV head) pairs, else on one (the output does
// not depend on it). Returns 0, or an error code before anything is computed.
int tq_decode(const void* q, int32_t io_is_bf16, int64_t q_row_stride, int64_t q_head_stride, const VectorSpec* ks,
              PoolView kp, const float* k_basis_t, const VectorSpec* vs, PoolView vp, const float* v_basis,
              int64_t num_slots, const void* kv_indptr, int32_t indptr_64, const void* kv_indices, int32_t indices_64,
              int64_t n_indices, int32_t batch, int32_t kv_heads, int32_t group, float sm_scale, float logit_cap,
              int32_t window, void* out, int32_t num_threads, int64_t parallel_min_keys) {
    std::vector<int64_t> indptr;
    if (int err = read_indptr(kv_indptr, indptr_64, batch + 1, indptr)) return err;
    if (int err = check_kv(indptr, kv_indices, indices_64, n_indices, num_slots)) return err;
    int64_t keys = 0;
    for (int b = 0; b < batch; ++b) {
        const int64_t len = indptr[b + 1] - indptr[b];
        keys += window >= 0 ? std::min<int64_t>(len, window + 1) : len;
    }
    const int threads = keys * kv_heads >= parallel_min_keys ? thread_count(num_threads) : 1;
    const int d = ks->head_dim, ek = ks->width, ev = vs->width, hq = kv_heads * group;
    const int64_t rows = static_cast<int64_t>(batch) * hq;
    std::vector<float> qs(static_cast<size_t>(rows) * ek), acc(static_cast<size_t>(rows) * ev);
    query_basis(q, io_is_bf16, q_row_stride, q_head_stride, rows, hq, d, k_basis_t, ek, qs.data(), 1);
    decode_attention(qs.data(), static_cast<int64_t>(hq) * ek, ek, ks, kp, vs, vp, indptr.data(), kv_indices,
                     indices_64, batch, kv_heads, group, sm_scale, logit_cap, window, acc.data(), threads);
    output_basis(acc.data(), rows, ev, v_basis, vs->head_dim, out, io_is_bf16, 1);
    return 0;
}

// New tokens of each request, causal over its prefix and themselves: q (T, Hq, d) -> out (T, Hq, d) contiguous, both
// bfloat16 or float32; request b owns query rows qo_indptr[b] : qo_indptr[b + 1] (its last tokens) and slots
// kv_indices[kv_indptr[b] : kv_indptr[b + 1]]. Rows of requests without slots come out zero. Threads as tq_decode,
// with (keys x KV heads x query rows) as the work. Returns 0, or an error code before anything is computed.
int tq_extend(const void* q, int32_t io_is_bf16, int64_t q_row_stride, int64_t q_head_stride, int64_t tokens,
              const VectorSpec* ks, PoolView kp, const float* k_basis_t, const VectorSpec* vs, PoolView vp,
              const float* v_basis, int64_t num_slots, const void* qo_indptr, int32_t qo_64, const void* kv_indptr,
              int32_t indptr_64, const void* kv_indices, int32_t indices_64, int64_t n_indices, int32_t batch,
              int32_t kv_heads, int32_t group, float sm_scale, float logit_cap, int32_t window, void* out,
              int32_t num_threads, int64_t parallel_min_keys) {
    std::vector<int64_t> qo, indptr;
    if (int err = read_indptr(qo_indptr, qo_64, batch + 1, qo)) return err;
    if (int err = read_indptr(kv_indptr, indptr_64, batch + 1, indptr)) return err;
    if (qo.back() != tokens) return kBadExtend;
    for (int b = 0; b < batch; ++b)
        if (indptr[b + 1] - indptr[b] < qo[b + 1] - qo[b]) return kBadExtend;
    if (int err = check_kv(indptr, kv_indices, indices_64, n_indices, num_slots)) return err;
    const double work = static_cast<double>(indptr.back() - indptr.front()) * kv_heads * std::max<int64_t>(tokens, 1);
    const int threads = work >= static_cast<double>(parallel_min_keys) ? thread_count(num_threads) : 1;
    const int d = ks->head_dim, ek = ks->width, ev = vs->width, hq = kv_heads * group;
    const int64_t rows = tokens * hq;
    std::vector<float> qs(static_cast<size_t>(rows) * ek), acc(static_cast<size_t>(rows) * ev, 0.f);
    query_basis(q, io_is_bf16, q_row_stride, q_head_stride, rows, hq, d, k_basis_t, ek, qs.data(), threads);
    extend_attention(qs.data(), static_cast<int64_t>(hq) * ek, ek, ks, kp, vs, vp, qo.data(), indptr.data(),
                     kv_indices, indices_64, batch, kv_heads, group, sm_scale, logit_cap, window, acc.data(),
                     threads);
    output_basis(acc.data(), rows, ev, v_basis, vs->head_dim, out, io_is_bf16, threads);
    return 0;
}

}  // extern "C"
