// CPU matrix multiplies for LLaVA's linear layers, and a finite check for weights.
//
//   y[M, N] (float32) = x[M, K] (float32) @ W[N, K]^T,   W float32, float16 or bfloat16, stored [N, K]
//                                                         (one contiguous row per output: HF's layout)
//
// Few rows (a decode step of fewer than m_large = 8 sequences): the decode kernels. Decode reads every weight
// once per step, so they are bound by memory bandwidth: W is read row by row at its own width (16-bit W: half
// the bytes of float32) and widened in registers; accumulation in float32.
//     avx512bf16  bfloat16 W and M >= 4 only: the packed kernel below; with fewer rows or other weights it is
//                 the avx512 path
//     avx512      AVX-512 fp32 FMA          avx2  AVX2 + FMA + F16C          scalar  portable C++
// More rows (a prompt, or a decode step of 8+ sequences: arithmetic starts to count), bound by arithmetic:
//     packed      16-bit W on a CPU with AVX512-BF16: our packed kernel, x and W rounded to bfloat16 in cache,
//                 vdpbf16ps (32 multiply-adds per instruction), float32 sums
//     onednn      float32 W (float32 arithmetic), and 16-bit W on CPUs without AVX512-BF16: oneDNN's matmul,
//                 from the libdnnl.so.3 that MindSpore ships (dlopen'ed; its C API is declared below); a 16-bit W
//                 converted 1024 rows at a time (to bfloat16 with bfloat16 arithmetic, else float32). The packed
//                 kernel beats it at every row count measured for float16 W, which it must first convert
//                 (bench/RESULTS.md, kernels). Without oneDNN the decode kernels take every M.
//
// Around the multiplies, what a layer does between them, each in one pass over memory (MindSpore's CPU ops take
// several, and each op of an op-by-op prompt costs its dispatch): bias and activation added as the product is
// written (quick_gelu, erf GELU), SwiGLU (silu(x Wg^T) * x Wu^T), LayerNorm and RMSNorm, and attention
// (softmax(q k^T * scale + mask) v, the two products by oneDNN over all heads at once, float32; a decode step's,
// one token after a KV cache, a pass over each row's visible slots).
//
// Every ISA-specific function carries __attribute__((target(...))) and the file is built for baseline x86-64,
// so one .so runs on any x86-64 CPU and picks its paths at load (cpuid, and the OS's AVX-512 / AMX state).
// Threads: one persistent pool (the calling thread and workers, one per CPU this process may use), rows of W
// handed out in chunks; oneDNN runs on the same pool. A call arriving while the pool is busy runs inline.
#include <cpuid.h>
#include <dlfcn.h>
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define T512BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#define TAVX2 __attribute__((target("avx2,fma,f16c")))
#define AI inline __attribute__((always_inline))

enum WeightType { WT_F32 = 0, WT_F16 = 1, WT_BF16 = 2 };
template <int WT> using Elem = std::conditional_t<WT == WT_F32, float, uint16_t>;
enum SmallPath { SP_SCALAR = 0, SP_AVX2 = 1, SP_AVX512 = 2, SP_AVX512BF = 3 };
enum LargePath { LP_DECODE = 0, LP_ONEDNN = 1, LP_PACKED = 2 };  // packed: 16-bit W only, float32 W by oneDNN

// ------------------------------------------------------------------------------------------ CPU and settings
struct Cpu { bool avx2 = false, avx512 = false, avx512bf16 = false, amx = false; };

static Cpu detect_cpu() {
  Cpu r;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return r;
  bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
  uint64_t xcr0 = 0;
  if (osxsave) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = ((uint64_t)hi << 32) | lo;
  }
  bool ymm_state = (xcr0 & 6) == 6, zmm_state = (xcr0 & 0xe6) == 0xe6;
  if (__get_cpuid_max(0, nullptr) < 7) return r;
  __cpuid_count(7, 0, a, b, c, d);
  r.avx2 = avx && ymm_state && (b & (1u << 5)) && fma && f16c;
  r.avx512 = r.avx2 && zmm_state && (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));
  bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
  if (a >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    r.avx512bf16 = r.avx512 && (a & (1u << 5));
  }
  r.amx = amx_bf16 && amx_tile && ((xcr0 >> 17) & 3) == 3;
  return r;
}

struct Settings {
  Cpu cpu;
  int small_path = SP_SCALAR;  // the best the CPU has, unless a test forces another
  int large_path = LP_ONEDNN;  // LP_PACKED where the CPU has AVX512-BF16
  int64_t m_large = 8;         // M >= m_large: the large path (from 8 rows on it beats the decode kernels: RESULTS.md)
  int bf16_dot_min_m = 4;      // avx512bf16 with bfloat16 W from this many rows on (below: widening is as fast)
  int nthreads = 1;
  int64_t onednn_chunk = 1024; // rows of a float16 W converted per oneDNN call
};
static Settings g;

static int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  unsigned n = std::thread::hardware_concurrency();
  return n ? (int)n : 1;
}

static void default_paths() {
  Settings defaults;
  g.small_path = g.cpu.avx512bf16 ? SP_AVX512BF : g.cpu.avx512 ? SP_AVX512 : g.cpu.avx2 ? SP_AVX2 : SP_SCALAR;
  g.large_path = g.cpu.avx512bf16 ? LP_PACKED : defaults.large_path;
  g.m_large = defaults.m_large;
}
static void init_settings() {
  g.cpu = detect_cpu();
  default_paths();
  g.nthreads = usable_cpus();
}
static std::once_flag g_init_once;
static void ensure_init() { std::call_once(g_init_once, init_settings); }

static int best_small_path_up_to(int path) {  // a forced path the CPU lacks falls back to the next one down
  if (path == SP_AVX512BF && !g.cpu.avx512bf16) path = SP_AVX512;
  if (path == SP_AVX512 && !g.cpu.avx512) path = SP_AVX2;
  if (path == SP_AVX2 && !g.cpu.avx2) path = SP_SCALAR;
  return path;
}

// ------------------------------------------------------------------------------------------ thread pool
// run(ntask, fn): fn(i) for every i in [0, ntask), tasks taken in order by the caller and the workers. Workers
// sleep on a futex between jobs (spinning cost more than it saved, measured next to MindSpore's own threads).
static thread_local bool tl_in_pool = false;

class Pool {
 public:
  explicit Pool(int nthreads) : size_(std::max(1, nthreads)) {
    for (int i = 1; i < size_; i++) workers_.emplace_back([this] { work(); });
  }
  ~Pool() {
    stop_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return size_; }
  void run(int ntask, const std::function<void(int)>& fn) {
    if (ntask <= 0) return;
    std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
    if (size_ == 1 || ntask == 1 || tl_in_pool || !lock.owns_lock()) {
      for (int i = 0; i < ntask; i++) fn(i);
      return;
    }
    fn_ = &fn;
    ntask_ = ntask;
    next_.store(0, std::memory_order_relaxed);
    uint32_t job = generation_.load() + 1;
    if (job == 0) job = 1;  // 0 means "no open job"
    open_.store(job);
    generation_.store(job);
    generation_.notify_all();
    tl_in_pool = true;
    take_tasks();
    tl_in_pool = false;
    open_.store(0);  // a worker waking up late sees the job closed and skips it
    while (busy_.load() != 0) _mm_pause();
  }

 private:
  void take_tasks() {
    for (int i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < ntask_;) (*fn_)(i);
  }
  void work() {
    tl_in_pool = true;
    uint32_t seen = 0;  // not generation_.load(): a job may already have been posted
    for (;;) {
      generation_.wait(seen);
      uint32_t job = generation_.load(std::memory_order_acquire);
      if (job == seen) continue;
      seen = job;
      if (stop_.load()) return;
      busy_.fetch_add(1);
      if (open_.load() == job) take_tasks();
      busy_.fetch_sub(1);
    }
  }
  int size_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::atomic<uint32_t> generation_{0}, open_{0};
  std::atomic<int> next_{0}, busy_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int)>* fn_ = nullptr;
  int ntask_ = 0;
};

static Pool* g_pool = nullptr;
static std::mutex g_pool_mutex;
static void parallel_for(int ntask, const std::function<void(int)>& fn) {
  {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (!g_pool) g_pool = new Pool(g.nthreads);
  }
  g_pool->run(ntask, fn);
}

template <class F> static void parallel_blocks(int64_t n, int64_t block, F f) {
  int ntask = (int)((n + block - 1) / block);
  parallel_for(ntask, [&](int t) { int64_t a = t * block, b = std::min(n, a + block); f(a, b); });
}

// ------------------------------------------------------------------------------------------ scalar conversions
static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, f;
  if (exponent == 0) {
    if (mantissa == 0) {
      f = sign;
    } else {  // subnormal
      int shift = 0;
      while (!(mantissa & 0x400)) { mantissa <<= 1; shift++; }
      f = sign | ((uint32_t)(127 - 15 - shift + 1) << 23) | ((mantissa & 0x3ff) << 13);
    }
  } else if (exponent == 31) {
    f = sign | 0x7f800000u | (mantissa << 13);
  } else {
    f = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float r;
  memcpy(&r, &f, 4);
  return r;
}
static inline float bf16_to_f32(uint16_t h) { uint32_t f = (uint32_t)h << 16; float r; memcpy(&r, &f, 4); return r; }
static inline uint16_t f32_to_bf16(float x) {  // round to nearest even
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // a quiet NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
template <int WT> static inline float to_f32(Elem<WT> v) {
  if constexpr (WT == WT_F32) return v;
  else if constexpr (WT == WT_F16) return f16_to_f32(v);
  else return bf16_to_f32(v);
}

// ------------------------------------------------------------------------------------------ decode kernels
// Each computes y[:, n0:n1] for rows n0..n1 of W. A tile is NR rows of W times MR rows of x over all of K.

template <int WT>
static void rows_scalar(const float* x, int64_t M, const Elem<WT>* w, int64_t K, float* y, int64_t N, int64_t n0,
                        int64_t n1) {
  float widened[256];
  for (int64_t n = n0; n < n1; n++) {
    const Elem<WT>* row = w + n * K;
    for (int64_t m = 0; m < M; m++) y[m * N + n] = 0.f;
    for (int64_t k0 = 0; k0 < K; k0 += 256) {
      int64_t kc = std::min<int64_t>(256, K - k0);
      for (int64_t k = 0; k < kc; k++) widened[k] = to_f32<WT>(row[k0 + k]);
      for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K + k0;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        int64_t k = 0;
        for (; k + 4 <= kc; k += 4) {
          s0 += xr[k] * widened[k]; s1 += xr[k + 1] * widened[k + 1];
          s2 += xr[k + 2] * widened[k + 2]; s3 += xr[k + 3] * widened[k + 3];
        }
        for (; k < kc; k++) s0 += xr[k] * widened[k];
        y[m * N + n] += (s0 + s1) + (s2 + s3);
      }
    }
  }
}

template <int WT> TAVX2 AI __m256 load8(const Elem<WT>* p) {
  if constexpr (WT == WT_F32) return _mm256_loadu_ps(p);
  else {
    __m128i v = _mm_loadu_si128((const __m128i*)p);
    if constexpr (WT == WT_F16) return _mm256_cvtph_ps(v);
    else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  }
}
template <int WT> TAVX2 AI float load1_avx2(const Elem<WT>* p) {
  if constexpr (WT == WT_F16) return _cvtsh_ss(*p);
  else return to_f32<WT>(*p);
}
TAVX2 AI float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int WT, int NR, int MR>
TAVX2 static void tile_avx2(const float* x, const Elem<WT>* w, int64_t K, float* y, int64_t ldy) {
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; m++) for (int r = 0; r < NR; r++) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MR];
    for (int m = 0; m < MR; m++) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int r = 0; r < NR; r++) {
      __m256 wv = load8<WT>(w + r * K + k);
      for (int m = 0; m < MR; m++) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);
    }
  }
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR; r++) {
      float s = hsum8(acc[m][r]);
      for (int64_t kk = k; kk < K; kk++) s += x[m * K + kk] * load1_avx2<WT>(w + r * K + kk);
      y[m * ldy + r] = s;
    }
}

template <int WT, int NR>
TAVX2 static void all_m_avx2(const float* x, int64_t M, const Elem<WT>* w, int64_t K, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile_avx2<WT, NR, 2>(x + m * K, w, K, y + m * N, N);
  if (m < M) tile_avx2<WT, NR, 1>(x + m * K, w, K, y + m * N, N);
}

template <int WT>
TAVX2 static void rows_avx2(const float* x, int64_t M, const Elem<WT>* w, int64_t K, float* y, int64_t N,
                            int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (M == 1) for (; n + 8 <= n1; n += 8) tile_avx2<WT, 8, 1>(x, w + n * K, K, y + n, N);
  for (; n + 4 <= n1; n += 4) all_m_avx2<WT, 4>(x, M, w + n * K, K, y + n, N);
  for (; n < n1; n++) all_m_avx2<WT, 1>(x, M, w + n * K, K, y + n, N);
}

template <int WT> T512 AI __m512 load16(const Elem<WT>* p, __mmask16 mask) {
  if constexpr (WT == WT_F32) return _mm512_maskz_loadu_ps(mask, p);
  else {
    __m256i v = _mm256_maskz_loadu_epi16(mask, p);
    if constexpr (WT == WT_F16) return _mm512_cvtph_ps(v);
    else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
}

template <int WT, int NR, int MR>
T512 static void tile_512(const float* x, const Elem<WT>* w, int64_t K, float* y, int64_t ldy) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; m++) for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
    __m512 xv[MR];
    for (int m = 0; m < MR; m++) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
    // 16-bit W: the NR rows are NR short streams (2 KB each for K = 1024) that the hardware prefetchers pick up
    // too late; fetching 2 KB ahead in each made one sequence's decode step from DRAM-cold weights ~25% faster
    // when it went through these tiles (bench/RESULTS.md, kernels). float32 W ran slower with it.
    if constexpr (WT != WT_F32)
      if ((k & 31) == 0)
        for (int r = 0; r < NR; r++) _mm_prefetch((const char*)(w + r * K + k) + 2048, _MM_HINT_T0);
    for (int r = 0; r < NR; r++) {
      __m512 wv = load16<WT>(w + r * K + k, mask);
      for (int m = 0; m < MR; m++) acc[m][r] = _mm512_fmadd_ps(xv[m], wv, acc[m][r]);
    }
  }
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR; r++) y[m * ldy + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int WT, int NR>
T512 static void all_m_512(const float* x, int64_t M, const Elem<WT>* w, int64_t K, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_512<WT, NR, 4>(x + m * K, w, K, y + m * N, N);
  switch (M - m) {
    case 3: tile_512<WT, NR, 3>(x + m * K, w, K, y + m * N, N); break;
    case 2: tile_512<WT, NR, 2>(x + m * K, w, K, y + m * N, N); break;
    case 1: tile_512<WT, NR, 1>(x + m * K, w, K, y + m * N, N); break;
  }
}

// One sequence (M = 1): W's rows one after the other, 64 values per step in four accumulators. Each thread then
// reads one sequential stream, which the hardware prefetchers follow at the full read bandwidth; NR rows read
// side by side are NR short streams, ~20% slower from DRAM (bench/RESULTS.md, kernels).
template <int WT> T512 static float row_dot_512(const float* x, const Elem<WT>* w, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), load16<WT>(w + k, 0xffff), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), load16<WT>(w + k + 16, 0xffff), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), load16<WT>(w + k + 32, 0xffff), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), load16<WT>(w + k + 48, 0xffff), a3);
  }
  for (; k < K; k += 16) {
    __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + k), load16<WT>(w + k, mask), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <int WT>
T512 static void rows_512(const float* x, int64_t M, const Elem<WT>* w, int64_t K, float* y, int64_t N, int64_t n0,
                          int64_t n1) {
  int64_t n = n0;
  if (M == 1) {
    for (; n < n1; n++) y[n] = row_dot_512<WT>(x, w + n * K, K);
    return;
  }
  for (; n + 4 <= n1; n += 4) all_m_512<WT, 4>(x, M, w + n * K, K, y + n, N);
  for (; n < n1; n++) all_m_512<WT, 1>(x, M, w + n * K, K, y + n, N);
}

// The packed kernel (AVX512-BF16; a bfloat16 W from 4 rows, a float16 W from m_large): bfloat16 products with
// float32 sums (oneDNN's prompt path's arithmetic). W is read once per call, a block of 64 rows by PK_KC k at a
// time, rounded to bfloat16 and packed in cache as [k pair][64 outputs][2]: one 64-byte load then holds, for 16
// outputs, their next two k values, and vdpbf16ps with a row of x's two values broadcast adds those 16 outputs'
// products. Sums stay in registers (no horizontal reductions) for a tile of PK_MR rows of x by the 64 outputs.
// x is pre-rounded to bfloat16 (rows of ldx values, zero-padded to a multiple of 32).
constexpr int64_t PK_KC = 2048;  // k per block: long runs of each W row (DRAM streams), 256 KB packed (in L2)
constexpr int PK_MR = 6;        // 6 x 4 accumulators + 4 of W + 1 of x in AVX-512's 32 registers

// n values of one W row -> bfloat16 (rounded to nearest even; a bfloat16 W is copied), while prefetching the
// same span of `ahead` (the rows staged next; may be null) into L2: their reads from memory then overlap this
// block's arithmetic instead of stalling the next staging (bench/RESULTS.md, kernels).
template <int WT> T512BF static void bf16_row(const uint16_t* s, uint16_t* d, int64_t n, const uint16_t* ahead) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    if (ahead) _mm_prefetch((const char*)(ahead + i), _MM_HINT_T1);
    if constexpr (WT == WT_BF16)
      _mm512_storeu_si512((void*)(d + i), _mm512_loadu_si512((const void*)(s + i)));
    else
      _mm512_storeu_si512((void*)(d + i), (__m512i)_mm512_cvtne2ps_pbh(
                                              _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + i + 16))),
                                              _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + i)))));
  }
  for (; i < n; i++) d[i] = WT == WT_BF16 ? s[i] : f32_to_bf16(f16_to_f32(s[i]));
}

// 16 bfloat16 rows (row stride ld) by `count` <= 32 k values -> out[p * ldo + r] = the pair (row r's 2p, 2p+1)
// for p < 16: a 16 x 16 transpose of 32-bit pairs (unpack 32, unpack 64, two 128-bit lane shuffles). Rows at or
// past `rows` and k at or past `count` are zeros.
T512BF static void pack16x32(const uint16_t* w, int64_t ld, int rows, int64_t count, uint32_t* out, int64_t ldo) {
  __mmask32 mask = count >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << count) - 1);
  __m512i a[16], b[16], c[16];
  for (int r = 0; r < 16; r++) a[r] = r < rows ? _mm512_maskz_loadu_epi16(mask, w + r * ld) : _mm512_setzero_si512();
  for (int r = 0; r < 16; r += 2) {
    b[r] = _mm512_unpacklo_epi32(a[r], a[r + 1]);
    b[r + 1] = _mm512_unpackhi_epi32(a[r], a[r + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // c[g + j], 128-bit lane L: rows g..g+3 at pair 4L + j
    c[g] = _mm512_unpacklo_epi64(b[g], b[g + 2]);
    c[g + 1] = _mm512_unpackhi_epi64(b[g], b[g + 2]);
    c[g + 2] = _mm512_unpacklo_epi64(b[g + 1], b[g + 3]);
    c[g + 3] = _mm512_unpackhi_epi64(b[g + 1], b[g + 3]);
  }
  for (int j = 0; j < 4; j++) {
    __m512i d0 = _mm512_shuffle_i32x4(c[j], c[4 + j], 0x44), d1 = _mm512_shuffle_i32x4(c[j], c[4 + j], 0xEE);
    __m512i d2 = _mm512_shuffle_i32x4(c[8 + j], c[12 + j], 0x44), d3 = _mm512_shuffle_i32x4(c[8 + j], c[12 + j], 0xEE);
    _mm512_storeu_si512((void*)(out + (0 + j) * ldo), _mm512_shuffle_i32x4(d0, d2, 0x88));
    _mm512_storeu_si512((void*)(out + (4 + j) * ldo), _mm512_shuffle_i32x4(d0, d2, 0xDD));
    _mm512_storeu_si512((void*)(out + (8 + j) * ldo), _mm512_shuffle_i32x4(d1, d3, 0x88));
    _mm512_storeu_si512((void*)(out + (12 + j) * ldo), _mm512_shuffle_i32x4(d1, d3, 0xDD));
  }
}

// y[0:MR, 0:n] (+)= x pairs [MR][pairs] . packed [pairs][64]; the first k block writes, later ones add.
template <int MR>
T512BF static void tile_packed(const uint32_t* xp, int64_t ldxp, const uint32_t* wp, int64_t pairs, float* y,
                               int64_t ldy, int n, bool first) {
  __mmask16 lanes[4];
  for (int v = 0; v < 4; v++) {
    int valid = std::min(16, std::max(0, n - 16 * v));
    lanes[v] = valid == 16 ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1);
  }
  __m512 acc[MR][4];
  for (int m = 0; m < MR; m++)
    for (int v = 0; v < 4; v++)
      acc[m][v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(lanes[v], y + m * ldy + 16 * v);
  for (int64_t p = 0; p < pairs; p++) {
    __m512bh wv[4];
    for (int v = 0; v < 4; v++) wv[v] = (__m512bh)_mm512_loadu_si512((const void*)(wp + p * 64 + 16 * v));
    for (int m = 0; m < MR; m++) {
      __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xp[m * ldxp + p]);
      for (int v = 0; v < 4; v++) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], xv, wv[v]);
    }
  }
  for (int m = 0; m < MR; m++)
    for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(y + m * ldy + 16 * v, lanes[v], acc[m][v]);
}

// y[:, n0:n1] for rows n0..n1 of W.
template <int WT>
T512BF static void rows_packed(const uint16_t* xb, int64_t ldx, int64_t M, const uint16_t* w, int64_t K, float* y,
                               int64_t N, int64_t n0, int64_t n1) {
  static thread_local std::vector<uint32_t> buffer(PK_KC / 2 * 64);
  static thread_local std::vector<uint16_t> staged(16 * PK_KC);
  uint32_t* packed = buffer.data();
  const uint32_t* xp = (const uint32_t*)xb;
  int64_t ldxp = ldx / 2;
  for (int64_t n = n0; n < n1; n += 64) {
    int rows = (int)std::min<int64_t>(64, n1 - n);
    for (int64_t k0 = 0; k0 < K; k0 += PK_KC) {
      int64_t kc = std::min(PK_KC, K - k0), pairs = (kc + 31) / 32 * 16;
      const uint16_t* ahead = k0 + PK_KC < K ? w + n * K + k0 + PK_KC : n + 64 < n1 ? w + (n + 64) * K : nullptr;
      for (int g = 0; g < 4; g++) {
        int group = std::max(0, std::min(16, rows - 16 * g));
        for (int r = 0; r < group; r++)  // one W row after the other: one sequential stream (see row_dot_512)
          bf16_row<WT>(w + (n + 16 * g + r) * K + k0, staged.data() + r * PK_KC, kc,
                       ahead ? ahead + (16 * g + r) * K : nullptr);
        for (int64_t k = 0; k < kc; k += 32)
          pack16x32(staged.data() + k, PK_KC, group, std::min<int64_t>(32, kc - k), packed + k / 2 * 64 + 16 * g, 64);
      }
      int64_t m = 0;
      for (; m + PK_MR <= M; m += PK_MR)
        tile_packed<PK_MR>(xp + m * ldxp + k0 / 2, ldxp, packed, pairs, y + m * N + n, N, rows, k0 == 0);
      const uint32_t* xm = xp + m * ldxp + k0 / 2;
      float* ym = y + m * N + n;
      switch (M - m) {
        case 5: tile_packed<5>(xm, ldxp, packed, pairs, ym, N, rows, k0 == 0); break;
        case 4: tile_packed<4>(xm, ldxp, packed, pairs, ym, N, rows, k0 == 0); break;
        case 3: tile_packed<3>(xm, ldxp, packed, pairs, ym, N, rows, k0 == 0); break;
        case 2: tile_packed<2>(xm, ldxp, packed, pairs, ym, N, rows, k0 == 0); break;
        case 1: tile_packed<1>(xm, ldxp, packed, pairs, ym, N, rows, k0 == 0); break;
      }
    }
  }
}

T512BF static void rows_to_bf16_padded(const float* x, int64_t M, int64_t K, uint16_t* xb, int64_t ldx) {
  for (int64_t m = 0; m < M; m++) {
    const float* s = x + m * K;
    uint16_t* d = xb + m * ldx;
    int64_t i = 0;
    for (; i + 32 <= K; i += 32)
      _mm512_storeu_si512((void*)(d + i),
                          (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + i + 16), _mm512_loadu_ps(s + i)));
    for (; i < ldx; i++) d[i] = i < K ? f32_to_bf16(s[i]) : 0;
  }
}

// The packed kernel over all of y: x rounded to bfloat16 once, W's rows handed out 64 at a time (about 8
// chunks per thread).
template <int WT>
T512BF static void packed_matmul(const float* x, const uint16_t* w, float* y, int64_t M, int64_t N, int64_t K) {
  int64_t ldx = (K + 31) / 32 * 32;
  static thread_local std::vector<uint16_t> x_bf16;
  x_bf16.resize(std::max(x_bf16.size(), (size_t)(M * ldx)));
  uint16_t* xb = x_bf16.data();
  rows_to_bf16_padded(x, M, K, xb, ldx);
  int64_t nt = g.nthreads, chunk = std::max<int64_t>(64, ((N + nt * 8 - 1) / (nt * 8) + 63) / 64 * 64);
  parallel_for((int)((N + chunk - 1) / chunk), [&](int t) {
    int64_t n0 = t * chunk;
    rows_packed<WT>(xb, ldx, M, w, K, y, N, n0, std::min(N, n0 + chunk));
  });
}

template <int WT>
static void decode_matmul(const float* x, const Elem<WT>* w, float* y, int64_t M, int64_t N, int64_t K) {
  int path = best_small_path_up_to(g.small_path);
  if constexpr (WT == WT_BF16) {
    if (path == SP_AVX512BF && M >= g.bf16_dot_min_m) return packed_matmul<WT>(x, w, y, M, N, K);
  }
  int nt = g.nthreads;
  void (*rows)(const float*, int64_t, const Elem<WT>*, int64_t, float*, int64_t, int64_t, int64_t) =
      path >= SP_AVX512 ? rows_512<WT> : path == SP_AVX2 ? rows_avx2<WT> : rows_scalar<WT>;
  // About 8 chunks per thread (load balance), each a multiple of 8 rows of W.
  int64_t chunk = std::max<int64_t>(M >= 8 ? 16 : 8, ((N + nt * 8 - 1) / (nt * 8) + 7) / 8 * 8);
  parallel_for((int)((N + chunk - 1) / chunk), [&](int t) {
    int64_t n0 = t * chunk;
    rows(x, M, w, K, y, N, n0, std::min(N, n0 + chunk));
  });
}

// ------------------------------------------------------------------------------------------ bulk conversions
T512BF static void f32_to_bf16_avx512bf16(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    _mm512_storeu_si512((void*)(d + i), (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + i + 16), _mm512_loadu_ps(s + i)));
  for (; i < n; i++) d[i] = f32_to_bf16(s[i]);
}
T512 AI __m256i f32x16_to_bf16(__m512 v) {  // round to nearest even (weights and activations are finite)
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}
T512 static void f16_to_bf16_avx512(const uint16_t* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i*)(d + i), f32x16_to_bf16(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + i)))));
  for (; i < n; i++) d[i] = f32_to_bf16(f16_to_f32(s[i]));
}
template <int WT> TAVX2 static void widen_avx2(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, load8<WT>(s + i));
  for (; i < n; i++) d[i] = to_f32<WT>(s[i]);
}
static void f32_to_bf16_any(const float* s, uint16_t* d, int64_t n) {
  if (g.cpu.avx512bf16) f32_to_bf16_avx512bf16(s, d, n);
  else for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(s[i]);
}
static void f16_to_bf16_any(const uint16_t* s, uint16_t* d, int64_t n) {
  if (g.cpu.avx512) f16_to_bf16_avx512(s, d, n);
  else for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(f16_to_f32(s[i]));
}
template <int WT> static void widen_any(const uint16_t* s, float* d, int64_t n) {
  if (g.cpu.avx2) widen_avx2<WT>(s, d, n);
  else for (int64_t i = 0; i < n; i++) d[i] = to_f32<WT>(s[i]);
}

// ------------------------------------------------------------------------------------------ elementwise
// exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln2/2, e^r by its Taylor series to r^7 (relative error
// below 1e-7, float32's own); large inputs clamped to the float range, and exp(x) for x < -69 (below 1e-30) is
// 0: a masked softmax would otherwise fill its probabilities with subnormal numbers, which x86 multiplies up to
// a hundred times slower (the attention's second product ran 30 times slower than its first).
T512 AI __m512 exp16(__m512 x) {
  __mmask16 significant = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-69.f), _CMP_GE_OQ);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-69.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(significant, _mm512_scalef_ps(p, n));
}

enum Activation { ACT_NONE = 0, ACT_QUICK_GELU = 1, ACT_GELU = 2 };

static inline float activate(float v, int act) {
  if (act == ACT_QUICK_GELU) return v / (1.f + std::exp(-1.702f * v));
  if (act == ACT_GELU) return 0.5f * v * (1.f + std::erf(v * 0.70710678f));
  return v;
}

// One row: y = act(y + bias). quick_gelu vectorized (it runs on every CLIP MLP); erf GELU (the projector's,
// once per image) scalar.
T512 static void bias_activation_512(float* y, int64_t n, const float* bias, int act) {
  int64_t i = 0;
  if (act != ACT_GELU) {
    for (; i + 16 <= n; i += 16) {
      __m512 v = _mm512_loadu_ps(y + i);
      if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + i));
      if (act == ACT_QUICK_GELU)
        v = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_mul_ps(v, _mm512_set1_ps(-1.702f)))));
      _mm512_storeu_ps(y + i, v);
    }
  }
  for (; i < n; i++) y[i] = activate(bias ? y[i] + bias[i] : y[i], act);
}
static void bias_activation_any(float* y, int64_t n, const float* bias, int act) {
  for (int64_t i = 0; i < n; i++) y[i] = activate(bias ? y[i] + bias[i] : y[i], act);
}

// y[M, N] = act(y + bias) row by row (bias may be null).
static void epilogue(float* y, int64_t M, int64_t N, const float* bias, int act) {
  if (!bias && act == ACT_NONE) return;
  int64_t rows = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, N));
  parallel_blocks(M, rows, [&](int64_t a, int64_t b) {
    for (int64_t m = a; m < b; m++) {
      if (g.cpu.avx512) bias_activation_512(y + m * N, N, bias, act);
      else bias_activation_any(y + m * N, N, bias, act);
    }
  });
}

// gate = silu(gate) * up, in place.
T512 static void swiglu_512(float* gate, const float* up, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 g = _mm512_loadu_ps(gate + i);
    __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_storeu_ps(gate + i, _mm512_mul_ps(s, _mm512_loadu_ps(up + i)));
  }
  for (; i < n; i++) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}
static void swiglu(float* gate, const float* up, int64_t n) {
  parallel_blocks(n, 1 << 15, [&](int64_t a, int64_t b) {
    if (g.cpu.avx512) swiglu_512(gate + a, up + a, b - a);
    else for (int64_t i = a; i < b; i++) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  });
}

// LayerNorm (with bias) or RMSNorm (bias null, no mean) of each row of x [M, C], float32 sums.
static void norm_rows(const float* x, const float* weight, const float* bias, float eps, float* y, int64_t M,
                      int64_t C, bool rms) {
  parallel_blocks(M, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, C)), [&](int64_t a, int64_t b) {
    for (int64_t m = a; m < b; m++) {
      const float* row = x + m * C;
      float* out = y + m * C;
      float mean = 0.f;
      if (!rms) {
        float s[4] = {0, 0, 0, 0};
        int64_t c = 0;
        for (; c + 4 <= C; c += 4) for (int j = 0; j < 4; j++) s[j] += row[c + j];
        for (; c < C; c++) s[0] += row[c];
        mean = ((s[0] + s[1]) + (s[2] + s[3])) / (float)C;
      }
      float q[4] = {0, 0, 0, 0};
      int64_t c = 0;
      for (; c + 4 <= C; c += 4) for (int j = 0; j < 4; j++) { float d = row[c + j] - mean; q[j] += d * d; }
      for (; c < C; c++) { float d = row[c] - mean; q[0] += d * d; }
      float inv = 1.f / std::sqrt(((q[0] + q[1]) + (q[2] + q[3])) / (float)C + eps);
      for (c = 0; c < C; c++) out[c] = (row[c] - mean) * inv * weight[c] + (bias ? bias[c] : 0.f);
    }
  });
}

// ------------------------------------------------------------------------------------------ oneDNN
// The C API of oneDNN 3.x, declared here (MindSpore ships the library, not its headers). MindSpore's build uses
// the threadpool runtime: it runs multithreaded only on a threadpool handed to its stream, ours.
namespace onednn {
typedef int status_t;
struct exec_arg_t { int arg; void* memory; };
enum { dt_f16 = 1, dt_bf16 = 2, dt_f32 = 3 };
enum { engine_cpu = 1 };
enum { ARG_SRC = 1, ARG_DST = 17, ARG_WEIGHTS = 33 };

struct threadpool_iface {  // the vtable of dnnl::threadpool_interop::threadpool_iface
  virtual int get_num_threads() const = 0;
  virtual bool get_in_parallel() const = 0;
  virtual void parallel_for(int n, const std::function<void(int, int)>& fn) = 0;
  virtual uint64_t get_flags() const = 0;
  virtual void wait() = 0;
  virtual ~threadpool_iface() {}
};
struct OurPool : threadpool_iface {
  int get_num_threads() const override { return g.nthreads; }
  bool get_in_parallel() const override { return tl_in_pool; }
  void parallel_for(int n, const std::function<void(int, int)>& fn) override {
    ::parallel_for(n, [&](int i) { fn(i, n); });
  }
  uint64_t get_flags() const override { return 0; }
  void wait() override {}
};

struct Api {
  void* lib = nullptr;
  bool ok = false;
  std::string error = "not loaded";
  status_t (*engine_create)(void**, int, size_t);
  status_t (*threadpool_stream_create)(void**, void*, void*);
  status_t (*set_max_concurrency)(int);
  status_t (*memory_desc_create_with_strides)(void**, int, const int64_t*, int, const int64_t*);
  status_t (*matmul_primitive_desc_create)(void**, void*, const void*, const void*, const void*, const void*, const void*);
  status_t (*primitive_desc_destroy)(void*);
  status_t (*primitive_create)(void**, const void*);
  status_t (*primitive_execute)(const void*, void*, int, const exec_arg_t*);
  status_t (*memory_create)(void**, const void*, void*, void*);
  status_t (*memory_destroy)(void*);
  status_t (*stream_wait)(void*);
  const int* (*version)();
  void* engine = nullptr;
  void* stream = nullptr;
  OurPool pool;
  std::string version_string;
};
static Api api;
static std::once_flag load_once;
static std::string library_path;  // MindSpore's libdnnl.so.3, set from Python before the first use

template <class T> static bool find(T& f, const char* name) {
  f = (T)dlsym(api.lib, name);
  if (!f) api.error = std::string("missing symbol ") + name;
  return f != nullptr;
}

static void load() {
  api.lib = dlopen("libdnnl.so.3", RTLD_NOW | RTLD_NOLOAD);  // already in the process once MindSpore is imported
  if (!api.lib && !library_path.empty()) api.lib = dlopen(library_path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (!api.lib) { api.error = "libdnnl.so.3 not found"; return; }
  bool found = find(api.engine_create, "dnnl_engine_create") &&
               find(api.threadpool_stream_create, "dnnl_threadpool_interop_stream_create") &&
               find(api.set_max_concurrency, "dnnl_threadpool_interop_set_max_concurrency") &&
               find(api.memory_desc_create_with_strides, "dnnl_memory_desc_create_with_strides") &&
               find(api.matmul_primitive_desc_create, "dnnl_matmul_primitive_desc_create") &&
               find(api.primitive_desc_destroy, "dnnl_primitive_desc_destroy") &&
               find(api.primitive_create, "dnnl_primitive_create") &&
               find(api.primitive_execute, "dnnl_primitive_execute") &&
               find(api.memory_create, "dnnl_memory_create") && find(api.memory_destroy, "dnnl_memory_destroy") &&
               find(api.stream_wait, "dnnl_stream_wait") && find(api.version, "dnnl_version");
  if (!found) return;
  const int* v = api.version();
  api.version_string = std::to_string(v[0]) + "." + std::to_string(v[1]) + "." + std::to_string(v[2]);
  if (v[0] != 3) { api.error = "oneDNN " + api.version_string + " is not 3.x"; return; }
  if (api.engine_create(&api.engine, engine_cpu, 0) != 0) { api.error = "engine_create failed"; return; }
  if (api.threadpool_stream_create(&api.stream, api.engine, &api.pool) != 0) { api.error = "stream_create failed"; return; }
  api.ok = true;
}
static bool available() { std::call_once(load_once, load); return api.ok; }

struct Matmul { void* primitive = nullptr; void* desc[3] = {nullptr, nullptr, nullptr}; };
// (M, N, K, leading dimension of y, activation type, weight type) -> a primitive made once and kept.
typedef std::tuple<int64_t, int64_t, int64_t, int64_t, int, int> Key;
static std::map<Key, Matmul> primitives;
static std::mutex mutex;  // oneDNN calls are serialized

static Matmul* get(int64_t M, int64_t N, int64_t K, int64_t ldy, int src_type, int weight_type) {
  Key key(M, N, K, ldy, src_type, weight_type);
  auto it = primitives.find(key);
  if (it != primitives.end()) return &it->second;
  Matmul mm;
  int64_t src_dims[2] = {M, K}, src_strides[2] = {K, 1};
  int64_t weight_dims[2] = {K, N}, weight_strides[2] = {1, K};  // W[N, K] read as its transpose
  int64_t dst_dims[2] = {M, N}, dst_strides[2] = {ldy, 1};
  if (api.memory_desc_create_with_strides(&mm.desc[0], 2, src_dims, src_type, src_strides) ||
      api.memory_desc_create_with_strides(&mm.desc[1], 2, weight_dims, weight_type, weight_strides) ||
      api.memory_desc_create_with_strides(&mm.desc[2], 2, dst_dims, dt_f32, dst_strides))
    return nullptr;
  api.set_max_concurrency(g.nthreads);
  void* primitive_desc = nullptr;
  if (api.matmul_primitive_desc_create(&primitive_desc, api.engine, mm.desc[0], mm.desc[1], nullptr, mm.desc[2],
                                       nullptr) != 0)
    return nullptr;
  int status = api.primitive_create(&mm.primitive, primitive_desc);
  api.primitive_desc_destroy(primitive_desc);
  if (status != 0) return nullptr;
  return &primitives.emplace(key, mm).first->second;
}

static int run(Matmul* mm, const void* src, const void* weights, float* dst) {
  void *src_memory = nullptr, *weight_memory = nullptr, *dst_memory = nullptr;
  int status = api.memory_create(&src_memory, mm->desc[0], api.engine, (void*)src) |
               api.memory_create(&weight_memory, mm->desc[1], api.engine, (void*)weights) |
               api.memory_create(&dst_memory, mm->desc[2], api.engine, (void*)dst);
  if (status == 0) {
    exec_arg_t args[3] = {{ARG_SRC, src_memory}, {ARG_WEIGHTS, weight_memory}, {ARG_DST, dst_memory}};
    status = api.primitive_execute(mm->primitive, api.stream, 3, args);
    if (status == 0) status = api.stream_wait(api.stream);
  }
  if (src_memory) api.memory_destroy(src_memory);
  if (weight_memory) api.memory_destroy(weight_memory);
  if (dst_memory) api.memory_destroy(dst_memory);
  return status;
}
// Batched products for attention: c[i] = a[i] @ b[i] for i < batch, every operand given by its strides
// (elements) over (batch, rows, cols): a [batch, M, K], b [batch, K, N] of `type` (dt_f32 or dt_bf16), c
// [batch, M, N] float32.
typedef std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                   int64_t, int64_t, int> BatchedKey;
static std::map<BatchedKey, Matmul> batched_primitives;

static int batched(int64_t batch, int64_t M, int64_t N, int64_t K, const void* a, const int64_t* sa, const void* b,
                   const int64_t* sb, float* c, const int64_t* sc, int type = dt_f32) {
  BatchedKey key(batch, M, N, K, sa[0], sa[1], sa[2], sb[0], sb[1], sb[2], sc[0], sc[1], sc[2], type);
  auto it = batched_primitives.find(key);
  Matmul* mm = nullptr;
  if (it != batched_primitives.end()) {
    mm = &it->second;
  } else {
    Matmul made;
    int64_t a_dims[3] = {batch, M, K}, b_dims[3] = {batch, K, N}, c_dims[3] = {batch, M, N};
    if (api.memory_desc_create_with_strides(&made.desc[0], 3, a_dims, type, sa) ||
        api.memory_desc_create_with_strides(&made.desc[1], 3, b_dims, type, sb) ||
        api.memory_desc_create_with_strides(&made.desc[2], 3, c_dims, dt_f32, sc))
      return -3;
    api.set_max_concurrency(g.nthreads);
    void* primitive_desc = nullptr;
    if (api.matmul_primitive_desc_create(&primitive_desc, api.engine, made.desc[0], made.desc[1], nullptr,
                                         made.desc[2], nullptr) != 0)
      return -3;
    int status = api.primitive_create(&made.primitive, primitive_desc);
    api.primitive_desc_destroy(primitive_desc);
    if (status != 0) return -3;
    mm = &batched_primitives.emplace(key, made).first->second;
  }
  return run(mm, a, b, c);
}
}  // namespace onednn

// Scratch buffers of the prompt path (grow only; `llava_release_scratch` frees them).
struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;
  void* get(size_t want) {
    if (want > bytes) {
      free(p);
      p = aligned_alloc(64, (want + 63) / 64 * 64);
      bytes = p ? want : 0;
    }
    return p;
  }
  void release() { free(p); p = nullptr; bytes = 0; }
};
static Scratch g_x_scratch, g_w_scratch;

// The prompt path; 0 on success (anything else: the caller falls back to the decode kernels).
template <int WT>
static int prompt_matmul(const float* x, const Elem<WT>* w, float* y, int64_t M, int64_t N, int64_t K) {
  if (!onednn::available()) return -1;
  std::lock_guard<std::mutex> lock(onednn::mutex);
  bool bf16_math = WT != WT_F32 && (g.cpu.avx512bf16 || g.cpu.amx);
  if constexpr (WT == WT_F32) {
    onednn::Matmul* mm = onednn::get(M, N, K, N, onednn::dt_f32, onednn::dt_f32);
    return mm ? onednn::run(mm, x, w, y) : -3;
  } else {
    const void* src = x;
    if (bf16_math) {
      uint16_t* x_bf16 = (uint16_t*)g_x_scratch.get(M * K * 2);
      if (!x_bf16) return -2;
      parallel_blocks(M * K, 1 << 16, [&](int64_t a, int64_t b) { f32_to_bf16_any(x + a, x_bf16 + a, b - a); });
      src = x_bf16;
      if constexpr (WT == WT_BF16) {
        onednn::Matmul* mm = onednn::get(M, N, K, N, onednn::dt_bf16, onednn::dt_bf16);
        return mm ? onednn::run(mm, src, w, y) : -3;
      }
    }
    // Convert `chunk` rows of W at a time (to bfloat16 or, without bfloat16 arithmetic, float32), multiply.
    int64_t chunk = std::min<int64_t>(N, g.onednn_chunk);
    size_t element = bf16_math ? 2 : 4;
    void* w_chunk = g_w_scratch.get(chunk * K * element);
    if (!w_chunk) return -2;
    int type = bf16_math ? onednn::dt_bf16 : onednn::dt_f32;
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      int64_t rows = std::min(chunk, N - n0);
      const uint16_t* part = w + n0 * K;
      parallel_blocks(rows * K, 1 << 15, [&](int64_t a, int64_t b) {
        if (bf16_math) f16_to_bf16_any(part + a, (uint16_t*)w_chunk + a, b - a);
        else widen_any<WT>(part + a, (float*)w_chunk + a, b - a);
      });
      onednn::Matmul* mm = onednn::get(M, rows, K, N, type, type);
      if (!mm) return -3;
      int status = onednn::run(mm, src, w_chunk, y + n0);
      if (status) return status;
    }
    return 0;
  }
}

// ------------------------------------------------------------------------------------------ attention
// One row of scores: s = softmax(s * scale + mask), the mask row may be null.
T512 static void softmax_row_512(float* s, const float* mask, int64_t L, float scale) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t l = 0; l < L; l += 16) {
    __mmask16 m = L - l >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (L - l)) - 1);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + l), _mm512_set1_ps(scale));
    if (mask) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, mask + l));
    _mm512_mask_storeu_ps(s + l, m, v);
    top = _mm512_mask_max_ps(top, m, top, v);
  }
  __m512 high = _mm512_set1_ps(_mm512_reduce_max_ps(top)), total = _mm512_setzero_ps();
  for (int64_t l = 0; l < L; l += 16) {
    __mmask16 m = L - l >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (L - l)) - 1);
    __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + l), high));
    _mm512_mask_storeu_ps(s + l, m, e);
    total = _mm512_mask_add_ps(total, m, total, e);
  }
  __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (int64_t l = 0; l < L; l += 16) {
    __mmask16 m = L - l >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (L - l)) - 1);
    _mm512_mask_storeu_ps(s + l, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + l), inverse));
  }
}
static void softmax_row_any(float* s, const float* mask, int64_t L, float scale) {
  float high = -INFINITY, total = 0.f;
  for (int64_t l = 0; l < L; l++) { s[l] = s[l] * scale + (mask ? mask[l] : 0.f); high = std::max(high, s[l]); }
  for (int64_t l = 0; l < L; l++) { s[l] = s[l] - high < -69.f ? 0.f : std::exp(s[l] - high); total += s[l]; }
  for (int64_t l = 0; l < L; l++) s[l] /= total;
}

// A prefix the batch rows share (a cached prompt start that several prompts continue): its keys and values
// [H, P, D], float32 or float16 (the KV cache's type); attended by every row before the row's own L keys.
struct SharedPrefix {
  const void* k = nullptr;
  const void* v = nullptr;
  bool half = false;  // float16, else float32
  int64_t P = 0;
};

// out = softmax(q k^T * scale + mask) v, float32, for q [B,H,T,D], k, v [B,H,L,D], out [B,T,H,D] (the layout the
// output projection reads: MindSpore's transpose of a 600-token prompt's heads took 5 ms a layer); or, with
// `tokens_major`, q [B,T,H,D] and k, v [B,L,H,D] too (the heads split by strides, as the projections write them:
// the vision tower's three transposes in and one out cost it a fifth of its time, bench/RESULTS.md). With a
// `prefix`, each row's keys are the prefix's P then its own L (one copy of the prefix for all rows: tiling it to
// every row, concatenating and casting with MindSpore's ops took half of a continued prefill, bench/RESULTS.md,
// serving). mask
// [Bm,Hm,T,P+L] (Bm 1 or B, Hm 1 or H; null: none). Heads of one row go in groups whose scores fit in 64 MB.
// `half`: the two products in bfloat16 (q, k, v and the probabilities rounded; sums, scores and softmax in
// float32) where the prompt path's matmuls have bfloat16 arithmetic (a CPU with it, not forced to the decode
// kernels), as HF's bf16 runs them: for 16-bit models, whose prompt matmuls round their inputs alike. Float32
// products took a fifth of the vision tower's time (bench/RESULTS.md).
static void attention(const float* q, const float* k, const float* v, const SharedPrefix& prefix, const float* mask,
                      int64_t Bm, int64_t Hm, float scale, float* out, int64_t B, int64_t H, int64_t T, int64_t L,
                      int64_t D, bool tokens_major, bool half) {
  int64_t P = prefix.P, LT = P + L;  // keys per row, prefix included
  int64_t group = std::max<int64_t>(1, std::min<int64_t>(H, (16 << 20) / std::max<int64_t>(1, T * LT)));
  static thread_local std::vector<float> scores;
  scores.resize(std::max(scores.size(), (size_t)(group * T * LT)));
  bool have_onednn = onednn::available();
  half = half && have_onednn && g.large_path != LP_DECODE && (g.cpu.avx512bf16 || g.cpu.amx);
  // Operands copied contiguous per head: in bfloat16 for `half`, and keys and values after a prefix (float32,
  // or bfloat16 for `half`), as [prefix; own] per head.
  bool gather_kv = half || P > 0;
  size_t element = half ? 2 : 4;
  static thread_local std::vector<uint16_t> q16, k_buffer, v_buffer, p16;
  if (half) {
    q16.resize(std::max(q16.size(), (size_t)(group * T * D)));
    p16.resize(std::max(p16.size(), (size_t)(group * T * LT)));
  }
  if (gather_kv) {
    k_buffer.resize(std::max(k_buffer.size(), (size_t)(group * LT * D) * element / 2));
    v_buffer.resize(std::max(v_buffer.size(), (size_t)(group * LT * D) * element / 2));
  }
  // Pointers, not the vectors: inside the pool's lambdas a thread_local name is the worker's own.
  uint16_t *qb = q16.data(), *pb = p16.data();
  void *kc = k_buffer.data(), *vc = v_buffer.data();
  // rows of float32 (own keys, q) or float16 (a float16 prefix) values into the products' type
  auto put = [&](void* dst, int64_t at, const void* src, bool src_half, int64_t n) {
    if (half && src_half) f16_to_bf16_any((const uint16_t*)src, (uint16_t*)dst + at, n);
    else if (half) f32_to_bf16_any((const float*)src, (uint16_t*)dst + at, n);
    else if (src_half) widen_any<WT_F16>((const uint16_t*)src, (float*)dst + at, n);
    else memcpy((float*)dst + at, src, n * 4);
  };
  // Element strides over (head, row, column) of q/out and of k/v, and offsets of head h of batch row b.
  int64_t head_q = tokens_major ? D : T * D, row_q = tokens_major ? H * D : D;
  int64_t head_k = tokens_major ? D : L * D, row_k = tokens_major ? H * D : D;
  auto q_at = [&](int64_t b, int64_t h) { return tokens_major ? (b * T * H + h) * D : (b * H + h) * T * D; };
  auto k_at = [&](int64_t b, int64_t h) { return tokens_major ? (b * L * H + h) * D : (b * H + h) * L * D; };
  auto o_at = [&](int64_t b, int64_t h) { return (b * T * H + h) * D; };  // out: tokens-major always
  int64_t head_o = D, row_o = H * D;
  // The products' operands: q strided (float32) or contiguous (bfloat16); k, v strided or contiguous.
  int64_t sq[3] = {half ? T * D : head_q, half ? D : row_q, 1};
  int64_t kv_head = gather_kv ? LT * D : head_k, kv_row = gather_kv ? D : row_k;
  int64_t skt[3] = {kv_head, 1, kv_row}, sv[3] = {kv_head, kv_row, 1};
  int64_t ss[3] = {T * LT, LT, 1}, so[3] = {head_o, row_o, 1};
  int type = half ? onednn::dt_bf16 : onednn::dt_f32;
  auto operand = [&](const void* base, int64_t at) {
    return half ? bf16_to_f32(((const uint16_t*)base)[at]) : ((const float*)base)[at];
  };
  for (int64_t b = 0; b < B; b++)
    for (int64_t first = 0; first < H; first += group) {
      int64_t n = std::min(group, H - first);
      const float *qh = q + q_at(b, first), *kh = k + k_at(b, first), *vh = v + k_at(b, first);
      float* oh = out + o_at(b, first);
      float* s = scores.data();
      if (gather_kv)
        parallel_for((int)n, [&](int i) {
          if (half)
            for (int64_t t = 0; t < T; t++) put(qb, (i * T + t) * D, qh + i * head_q + t * row_q, false, D);
          if (P > 0 && (b == 0 || group < H)) {  // one group of all heads: later rows find the prefix in place
            int64_t at = (first + i) * P * D, bytes = prefix.half ? 2 : 4;
            put(kc, i * LT * D, (const char*)prefix.k + at * bytes, prefix.half, P * D);
            put(vc, i * LT * D, (const char*)prefix.v + at * bytes, prefix.half, P * D);
          }
          for (int64_t l = 0; l < L; l++) {
            put(kc, (i * LT + P + l) * D, kh + i * head_k + l * row_k, false, D);
            put(vc, (i * LT + P + l) * D, vh + i * head_k + l * row_k, false, D);
          }
        });
      const void* qa = half ? (const void*)qb : qh;
      const void* ka = gather_kv ? (const void*)kc : kh;
      const void* va = gather_kv ? (const void*)vc : vh;
      int status = -1;
      if (have_onednn) {
        std::lock_guard<std::mutex> lock(onednn::mutex);
        status = onednn::batched(n, T, LT, D, qa, sq, ka, skt, s, ss, type);
      }
      if (status) {  // without oneDNN: plain loops
        parallel_for((int)n, [&](int i) {
          for (int64_t t = 0; t < T; t++)
            for (int64_t l = 0; l < LT; l++) {
              float sum = 0.f;
              for (int64_t d = 0; d < D; d++)
                sum += operand(qa, i * sq[0] + t * sq[1] + d) * operand(ka, i * skt[0] + l * skt[2] + d);
              s[(i * T + t) * LT + l] = sum;
            }
        });
      }
      parallel_blocks(n * T, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, LT)), [&](int64_t a, int64_t e) {
        for (int64_t r = a; r < e; r++) {
          int64_t h = first + r / T, t = r % T;
          const float* mask_row = nullptr;
          if (mask) mask_row = mask + (((Bm == 1 ? 0 : b) * Hm + (Hm == 1 ? 0 : h)) * T + t) * LT;
          if (g.cpu.avx512) softmax_row_512(s + r * LT, mask_row, LT, scale);
          else softmax_row_any(s + r * LT, mask_row, LT, scale);
        }
      });
      if (half)
        parallel_blocks(n * T * LT, 1 << 16, [&](int64_t a, int64_t e) { f32_to_bf16_any(s + a, pb + a, e - a); });
      status = -1;
      if (have_onednn) {
        std::lock_guard<std::mutex> lock(onednn::mutex);
        status = onednn::batched(n, T, D, LT, half ? (const void*)pb : s, ss, va, sv, oh, so, type);
      }
      if (status) {
        parallel_for((int)n, [&](int i) {
          for (int64_t t = 0; t < T; t++)
            for (int64_t d = 0; d < D; d++) {
              float sum = 0.f;
              for (int64_t l = 0; l < LT; l++) sum += s[(i * T + t) * LT + l] * operand(va, i * sv[0] + l * sv[1] + d);
              oh[i * head_o + t * row_o + d] = sum;
            }
        });
      }
    }
}

// A decode step's attention: one new token per row after the rows' KV cache, each (row, head) a pass over its
// cache: out = softmax([q k_cache^T, q k_new^T] * scale + [mask, 0]) [v_cache; v_new]. q, k_new, v_new [B,H,1,D];
// k_cache, v_cache [B,H,L,D], float32 or float16 (WT: a 16-bit cache is half the bytes a step reads, widened in
// registers); mask [B,1,1,L], 0 (visible) or a large negative (hidden), as everywhere here: slots after a row's
// last visible one are not read, so a row at position p reads p slots, not the whole cache. sharing [B,2]: row
// b's slots below sharing[b][1] are read from row sharing[b][0], which holds the same values (rows continuing one
// cached prompt start each hold a copy): (row, head) pairs go head by head, so the rows that share a head's prefix
// read it from cache, not memory (bench/RESULTS.md, serving).
template <int WT> struct Slots {  // the keys (or values) one (row, head) reads
  const Elem<WT>* shared;  // slots below `split`
  const Elem<WT>* own;     // the others
  int64_t split, D;
  AI const Elem<WT>* at(int64_t l) const { return (l < split ? shared : own) + l * D; }
};
template <int WT> T512 static float dot_512(const float* a, const Elem<WT>* b, int64_t n) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), load16<WT>(b + i, m), sum);
  }
  return _mm512_reduce_add_ps(sum);
}
template <int WT> T512 static void axpy_512(float a, const Elem<WT>* x, float* y, int64_t n) {  // y += a x
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(_mm512_set1_ps(a), load16<WT>(x + i, m),
                                                    _mm512_maskz_loadu_ps(m, y + i)));
  }
}
template <int WT> static float dot_any(const float* a, const Elem<WT>* b, int64_t n) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; i++) sum += a[i] * to_f32<WT>(b[i]);
  return sum;
}
template <int WT> static void axpy_any(float a, const Elem<WT>* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] += a * to_f32<WT>(x[i]);
}

// The sums of 16 vectors' lanes, as one vector (sum of v[j] in lane j): three rounds of pairwise unpacks and
// lane shuffles, instead of 16 full horizontal reductions.
T512 static __m512 lane_sums16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; i++)  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3) of the pair (a, b)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++) {  // per 128-bit lane: the four vectors' sums over that lane
    __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// One (row, head) of a decode step with AVX-512 and D = 16 C: q (scaled once) in C registers, the scores of 16
// cached keys per lane_sums16, the weighted sum of the values in C registers (the per-slot loops of the generic
// path reduce each score and load and store the output row: ~2x slower at 16 rows of 620 positions).
template <int WT, int C> T512 AI __m512 lane_products(const __m512* q, const Elem<WT>* k) {  // q . k, by lane
  __m512 a = _mm512_mul_ps(q[0], load16<WT>(k, 0xffff));
  for (int c = 1; c < C; c++) a = _mm512_fmadd_ps(q[c], load16<WT>(k + 16 * c, 0xffff), a);
  return a;
}

template <int WT, int C>
T512 static void attention_decode_head_512(const float* qi, Slots<WT> keys, Slots<WT> values, const float* k_own,
                                           const float* v_own, const float* mask_row, int64_t n, float scale,
                                           float* s, float* oi) {
  __m512 q[C];
  for (int c = 0; c < C; c++) q[c] = _mm512_mul_ps(_mm512_loadu_ps(qi + 16 * c), _mm512_set1_ps(scale));
  int64_t l = 0;
  for (; l + 16 <= n; l += 16) {
    __m512 block[16];
    for (int j = 0; j < 16; j++) block[j] = lane_products<WT, C>(q, keys.at(l + j));
    _mm512_storeu_ps(s + l, _mm512_add_ps(lane_sums16(block), _mm512_loadu_ps(mask_row + l)));
  }
  for (; l < n; l++) s[l] = _mm512_reduce_add_ps(lane_products<WT, C>(q, keys.at(l))) + mask_row[l];
  __m512 own = _mm512_mul_ps(q[0], _mm512_loadu_ps(k_own));
  for (int c = 1; c < C; c++) own = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(k_own + 16 * c), own);
  s[n] = _mm512_reduce_add_ps(own);
  softmax_row_512(s, nullptr, n + 1, 1.f);
  __m512 o[C];
  for (int c = 0; c < C; c++) o[c] = _mm512_mul_ps(_mm512_set1_ps(s[n]), _mm512_loadu_ps(v_own + 16 * c));
  for (l = 0; l < n; l++) {
    if (s[l] == 0.f) continue;  // hidden slots (exp flushed to 0) cost no pass over their values
    __m512 p = _mm512_set1_ps(s[l]);
    const Elem<WT>* value = values.at(l);
    for (int c = 0; c < C; c++) o[c] = _mm512_fmadd_ps(p, load16<WT>(value + 16 * c, 0xffff), o[c]);
  }
  for (int c = 0; c < C; c++) _mm512_storeu_ps(oi + 16 * c, o[c]);
}

template <int WT>
static void attention_decode(const float* q, const float* k_new, const float* v_new, const Elem<WT>* k_cache,
                             const Elem<WT>* v_cache, const float* mask, const int32_t* sharing, float scale,
                             float* out, int64_t B, int64_t H, int64_t L, int64_t D) {
  bool wide = best_small_path_up_to(g.small_path) >= SP_AVX512;  // forced down to scalar in tests
  using Head = void (*)(const float*, Slots<WT>, Slots<WT>, const float*, const float*, const float*, int64_t, float,
                        float*, float*);
  Head head = !wide ? nullptr : D == 16 ? attention_decode_head_512<WT, 1> : D == 32 ? attention_decode_head_512<WT, 2>
            : D == 64 ? attention_decode_head_512<WT, 4> : D == 128 ? attention_decode_head_512<WT, 8> : nullptr;
  parallel_for((int)(B * H), [&](int task) {
    int64_t b = task % B, h = task / B, i = b * H + h;  // head by head: see `sharing`
    const float* mask_row = mask + b * L;
    int64_t n = L;
    while (n > 0 && mask_row[n - 1] != 0.f) n--;
    static thread_local std::vector<float> s;
    s.resize(std::max(s.size(), (size_t)(n + 1)));
    const float* qi = q + i * D;
    int64_t source = (sharing[2 * b] * H + h) * L * D;
    Slots<WT> keys{k_cache + source, k_cache + i * L * D, sharing[2 * b + 1], D};
    Slots<WT> values{v_cache + source, v_cache + i * L * D, sharing[2 * b + 1], D};
    float* oi = out + i * D;
    if (head) {
      head(qi, keys, values, k_new + i * D, v_new + i * D, mask_row, n, scale, s.data(), oi);
      return;
    }
    for (int64_t l = 0; l < n; l++)
      s[l] = (wide ? dot_512<WT>(qi, keys.at(l), D) : dot_any<WT>(qi, keys.at(l), D)) * scale + mask_row[l];
    s[n] = (wide ? dot_512<WT_F32>(qi, k_new + i * D, D) : dot_any<WT_F32>(qi, k_new + i * D, D)) * scale;
    if (wide) softmax_row_512(s.data(), nullptr, n + 1, 1.f);
    else softmax_row_any(s.data(), nullptr, n + 1, 1.f);
    memset(oi, 0, sizeof(float) * D);
    for (int64_t l = 0; l < n; l++) {
      if (s[l] == 0.f) continue;  // hidden slots (exp flushed to 0) cost no pass over their values
      if (wide) axpy_512<WT>(s[l], values.at(l), oi, D);
      else axpy_any<WT>(s[l], values.at(l), oi, D);
    }
    if (wide) axpy_512<WT_F32>(s[n], v_new + i * D, oi, D);
    else axpy_any<WT_F32>(s[n], v_new + i * D, oi, D);
  });
}

template <int WT> static void matmul(const float* x, const Elem<WT>* w, float* y, int64_t M, int64_t N, int64_t K) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) { memset(y, 0, sizeof(float) * M * N); return; }
  if (M >= g.m_large) {
    if constexpr (WT != WT_F32)
      if (g.large_path == LP_PACKED) return packed_matmul<WT>(x, w, y, M, N, K);
    if (g.large_path != LP_DECODE && prompt_matmul<WT>(x, w, y, M, N, K) == 0) return;
  }
  decode_matmul<WT>(x, w, y, M, N, K);
}

static int dispatch(const float* x, const void* w, int wt, float* y, int64_t M, int64_t N, int64_t K) {
  ensure_init();
  switch (wt) {
    case WT_F32: matmul<WT_F32>(x, (const float*)w, y, M, N, K); return 0;
    case WT_F16: matmul<WT_F16>(x, (const uint16_t*)w, y, M, N, K); return 0;
    case WT_BF16: matmul<WT_BF16>(x, (const uint16_t*)w, y, M, N, K); return 0;
    default: return 3;
  }
}

// ------------------------------------------------------------------------------------------ the API
// The signature MindSpore calls an aot op with (ops.Custom, func_type "aot"): inputs, then outputs, in params.
#define LLAVA_OP(name)                                                                                        \
  int name([[maybe_unused]] int nparam, [[maybe_unused]] void** params, [[maybe_unused]] int* ndims,            \
           [[maybe_unused]] int64_t** shapes, [[maybe_unused]] const char** dtypes, [[maybe_unused]] void* stream, \
           [[maybe_unused]] void* extra)

extern "C" {

// The MindSpore op (ops.Custom, func_type "aot"): inputs x float32 [..., K] and W [N, K] (float32, float16 or
// bfloat16), output y float32 [..., N].
LLAVA_OP(LlavaMatmul) {
  if (nparam != 3 || strcmp(dtypes[0], "float32") || strcmp(dtypes[2], "float32")) return 1;
  int wt = !strcmp(dtypes[1], "float32") ? WT_F32 : !strcmp(dtypes[1], "float16") ? WT_F16
           : !strcmp(dtypes[1], "bfloat16") ? WT_BF16 : -1;
  if (wt < 0 || ndims[1] != 2 || ndims[0] < 1) return 2;
  int64_t K = shapes[0][ndims[0] - 1], M = 1;
  for (int i = 0; i < ndims[0] - 1; i++) M *= shapes[0][i];
  if (shapes[1][1] != K) return 4;
  return dispatch((const float*)params[0], params[1], wt, (float*)params[2], M, shapes[1][0], K);
}

static int weight_type(const char* dtype) {
  return !strcmp(dtype, "float32") ? WT_F32 : !strcmp(dtype, "float16") ? WT_F16 : !strcmp(dtype, "bfloat16") ? WT_BF16
                                                                                                            : -1;
}
static int64_t leading_rows(int ndim, const int64_t* shape) {
  int64_t rows = 1;
  for (int i = 0; i < ndim - 1; i++) rows *= shape[i];
  return rows;
}

// act(x @ W^T + bias): x float32 [..., K], W [N, K], bias float32 [N], act int32 [1] (0 none, 1 quick_gelu,
// 2 erf GELU); y float32 [..., N].
LLAVA_OP(LlavaLinear) {
  void* matmul_params[3] = {params[0], params[1], params[4]};
  int matmul_ndims[3] = {ndims[0], ndims[1], ndims[4]};
  int64_t* matmul_shapes[3] = {shapes[0], shapes[1], shapes[4]};
  const char* matmul_dtypes[3] = {dtypes[0], dtypes[1], dtypes[4]};
  if (nparam != 5 || strcmp(dtypes[2], "float32") || strcmp(dtypes[3], "int32")) return 1;
  int status = LlavaMatmul(3, matmul_params, matmul_ndims, matmul_shapes, matmul_dtypes, stream, extra);
  if (status) return status;
  epilogue((float*)params[4], leading_rows(ndims[0], shapes[0]), shapes[1][0], (const float*)params[2],
           *(const int32_t*)params[3]);
  return 0;
}

// silu(x @ Wg^T) * (x @ Wu^T): x float32 [..., K], Wg, Wu [N, K] of one dtype; y float32 [..., N].
LLAVA_OP(LlavaSwiGLU) {
  int wt = weight_type(dtypes[1]);
  if (nparam != 4 || wt < 0 || strcmp(dtypes[2], dtypes[1]) || strcmp(dtypes[0], "float32")) return 1;
  int64_t K = shapes[0][ndims[0] - 1], M = leading_rows(ndims[0], shapes[0]), N = shapes[1][0];
  static thread_local std::vector<float> up;
  up.resize(std::max(up.size(), (size_t)(M * N)));
  int status = dispatch((const float*)params[0], params[1], wt, (float*)params[3], M, N, K) |
               dispatch((const float*)params[0], params[2], wt, up.data(), M, N, K);
  if (status) return status;
  swiglu((float*)params[3], up.data(), M * N);
  return 0;
}

// LayerNorm: x float32 [..., C], weight, bias float32 [C], eps float32 [1] -> y float32 [..., C].
LLAVA_OP(LlavaLayerNorm) {
  if (nparam != 5) return 1;
  ensure_init();
  norm_rows((const float*)params[0], (const float*)params[1], (const float*)params[2], *(const float*)params[3],
            (float*)params[4], leading_rows(ndims[0], shapes[0]), shapes[0][ndims[0] - 1], false);
  return 0;
}

// RMSNorm: x float32 [..., C], weight float32 [C], eps float32 [1] -> y float32 [..., C].
LLAVA_OP(LlavaRMSNorm) {
  if (nparam != 4) return 1;
  ensure_init();
  norm_rows((const float*)params[0], (const float*)params[1], nullptr, *(const float*)params[2], (float*)params[3],
            leading_rows(ndims[0], shapes[0]), shapes[0][ndims[0] - 1], true);
  return 0;
}

// softmax(q k^T * scale + mask) v: q float32 [B, H, T, D], k, v [B, H, L, D], mask [B or 1, H or 1, T, L],
// scale [1], half int32 [1] (bfloat16 products, see attention) -> out [B, T, H, D].
LLAVA_OP(LlavaAttention) {
  if (nparam != 7 || ndims[0] != 4 || ndims[1] != 4 || ndims[3] != 4 || strcmp(dtypes[5], "int32")) return 1;
  ensure_init();
  const int64_t *qs = shapes[0], *ks = shapes[1];
  attention((const float*)params[0], (const float*)params[1], (const float*)params[2], SharedPrefix{},
            (const float*)params[3], shapes[3][0], shapes[3][1], *(const float*)params[4], (float*)params[6], qs[0], qs[1], qs[2], ks[2], qs[3],
            false, *(const int32_t*)params[5] != 0);
  return 0;
}

// Prompts that continue one cached prefix: q, k, v float32 [B, H, T, D] (the prompts' own tokens), prefix_k,
// prefix_v [1, H, P, D] (float32 or float16), mask [Bm, Hm, T, P+T], scale [1], half int32 [1] -> out [B, T, H, D].
LLAVA_OP(LlavaAttentionAfterPrefix) {
  if (nparam != 9 || ndims[0] != 4 || ndims[1] != 4 || ndims[3] != 4 || ndims[5] != 4 || strcmp(dtypes[7], "int32"))
    return 1;
  for (int i : {0, 1, 2, 5, 6, 8}) if (strcmp(dtypes[i], "float32")) return 1;
  SharedPrefix prefix{params[3], params[4], !strcmp(dtypes[3], "float16"), shapes[3][2]};
  if (strcmp(dtypes[3], dtypes[4]) || (!prefix.half && strcmp(dtypes[3], "float32"))) return 1;
  const int64_t *qs = shapes[0], *ks = shapes[1], *ps = shapes[3];
  if (ps[0] != 1 || ps[1] != qs[1] || ps[3] != qs[3] || memcmp(ks, qs, 4 * sizeof(int64_t)) ||
      memcmp(shapes[4], ps, 4 * sizeof(int64_t)) || shapes[5][3] != ps[2] + ks[2])
    return 2;
  ensure_init();
  attention((const float*)params[0], (const float*)params[1], (const float*)params[2], prefix,
            (const float*)params[5], shapes[5][0], shapes[5][1], *(const float*)params[6], (float*)params[8], qs[0],
            qs[1], qs[2], ks[2], qs[3], false, *(const int32_t*)params[7] != 0);
  return 0;
}

// Every token sees every token, heads split by strides: q, k, v float32 [B, T, H*D], heads int32 [1], scale [1],
// half int32 [1] -> out [B, T, H*D].
LLAVA_OP(LlavaSelfAttention) {
  if (nparam != 7 || ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3 || strcmp(dtypes[3], "int32") ||
      strcmp(dtypes[5], "int32"))
    return 1;
  const int64_t *qs = shapes[0];
  int64_t H = *(const int32_t*)params[3];
  if (H <= 0 || qs[2] % H || shapes[1][2] != qs[2] || shapes[1][1] != qs[1]) return 2;
  ensure_init();
  attention((const float*)params[0], (const float*)params[1], (const float*)params[2], SharedPrefix{}, nullptr, 1, 1,
            *(const float*)params[4], (float*)params[6], qs[0], H, qs[1], qs[1], qs[2] / H, true,
            *(const int32_t*)params[5] != 0);
  return 0;
}

// attention_decode: q, k_new, v_new float32 [B, H, 1, D], k_cache, v_cache [B, H, L, D] (both float32 or both
// float16), mask [B, 1, 1, L], sharing int32 [B, 2] (source row, slots; each row its own: (b, 0)), scale [1] ->
// out [B, H, 1, D].
LLAVA_OP(LlavaAttentionDecode) {
  if (nparam != 9 || ndims[0] != 4 || ndims[3] != 4 || ndims[5] != 4 || ndims[6] != 2 || strcmp(dtypes[6], "int32"))
    return 1;
  for (int i : {0, 1, 2, 5, 7, 8}) if (strcmp(dtypes[i], "float32")) return 1;
  bool half = !strcmp(dtypes[3], "float16");
  if (strcmp(dtypes[3], dtypes[4]) || (!half && strcmp(dtypes[3], "float32"))) return 1;
  const int64_t *qs = shapes[0], *cs = shapes[3];
  if (qs[2] != 1 || cs[0] != qs[0] || cs[1] != qs[1] || cs[3] != qs[3] || shapes[5][3] != cs[2] ||
      shapes[6][0] != qs[0] || shapes[6][1] != 2)
    return 2;
  const int32_t* sharing = (const int32_t*)params[6];
  for (int64_t b = 0; b < qs[0]; b++)
    if (sharing[2 * b] < 0 || sharing[2 * b] >= qs[0] || sharing[2 * b + 1] < 0 || sharing[2 * b + 1] > cs[2]) return 2;
  ensure_init();
  const float *q = (const float*)params[0], *k = (const float*)params[1], *v = (const float*)params[2];
  const float* mask = (const float*)params[5];
  float scale = *(const float*)params[7];
  if (half)
    attention_decode<WT_F16>(q, k, v, (const uint16_t*)params[3], (const uint16_t*)params[4], mask, sharing, scale,
                             (float*)params[8], qs[0], qs[1], cs[2], qs[3]);
  else
    attention_decode<WT_F32>(q, k, v, (const float*)params[3], (const float*)params[4], mask, sharing, scale,
                             (float*)params[8], qs[0], qs[1], cs[2], qs[3]);
  return 0;
}

// A decoder layer's three input projections with the rotary embedding, in the [B, H, T, D] layout attention
// takes: x float32 [B, T, K]; Wq, Wk, Wv [N, K] of one dtype (N = heads * D); positions int32 [B, T]; cos, sin
// float32 [P, D] (HF's tables: the D/2 frequencies twice) -> q, k, v float32 [B, H, T, D] (q and k rotated, v
// as is; three outputs: a compiled graph slices one [3, ...] output with MindSpore's element-by-element
// StridedSlice, which slowed the decode step, bench/RESULTS.md, serving). One op and one pass over the products
// where MindSpore's ops would be three products, three head splits (transposes) and fourteen elementwise rotary
// ops, each a pass over memory and a dispatch.
static void rotate_row(float* v, const float* c, const float* s, int64_t D) {  // v*cos + (-v2, v1)*sin, in place
  int64_t half = D / 2;
  for (int64_t i = 0; i < half; i++) {
    float a = v[i], b = v[i + half];
    v[i] = a * c[i] - b * s[i];
    v[i + half] = b * c[i + half] + a * s[i + half];
  }
}
LLAVA_OP(LlavaQKVRotary) {
  int wt = weight_type(dtypes[1]);
  if (nparam != 10 || wt < 0 || strcmp(dtypes[2], dtypes[1]) || strcmp(dtypes[3], dtypes[1]) ||
      strcmp(dtypes[0], "float32") || strcmp(dtypes[4], "int32") || strcmp(dtypes[5], "float32") ||
      strcmp(dtypes[6], "float32") || ndims[0] != 3 || ndims[4] != 2 || ndims[5] != 2 || ndims[6] != 2)
    return 1;
  const int64_t B = shapes[0][0], T = shapes[0][1], K = shapes[0][2], N = shapes[1][0];
  const int64_t P = shapes[5][0], D = shapes[5][1], H = D > 0 ? N / D : 0, M = B * T;
  if (D <= 0 || D % 2 || H * D != N || shapes[2][0] != N || shapes[3][0] != N || shapes[4][0] != B ||
      shapes[4][1] != T || shapes[6][0] != P || shapes[6][1] != D)
    return 2;
  const int32_t* positions = (const int32_t*)params[4];
  const float *cos = (const float*)params[5], *sin = (const float*)params[6];
  float* out[3] = {(float*)params[7], (float*)params[8], (float*)params[9]};
  // One token per row (a decode step): [B, 1, N] is already [B, H, 1, D], so the products land in place.
  static thread_local std::vector<float> scratch;
  if (T > 1) scratch.resize(std::max(scratch.size(), (size_t)(3 * M * N)));
  float* y = scratch.data();
  for (int part = 0; part < 3; part++) {
    int status = dispatch((const float*)params[0], params[1 + part], wt, T > 1 ? y + part * M * N : out[part], M,
                          N, K);
    if (status) return status;
  }
  parallel_blocks(3 * M, 64, [&](int64_t a, int64_t b) {  // rows (part, b, t) of the products
    for (int64_t r = a; r < b; r++) {
      int64_t part = r / M, row = r % M, batch = row / T, t = row % T;
      int64_t p = std::min<int64_t>(std::max<int32_t>(positions[row], 0), P - 1);
      for (int64_t h = 0; h < H; h++) {
        float* dst = out[part] + ((batch * H + h) * T + t) * D;
        if (T > 1) memcpy(dst, y + r * N + h * D, sizeof(float) * D);
        if (part < 2) rotate_row(dst, cos + p * D, sin + p * D, D);
      }
    }
  });
  return 0;
}

// Rows of a table: table [V, D] (float32, float16 or bfloat16), ids int32 [...] -> float32 [..., D] (ids outside
// the table give zeros; the processor and the vocabulary check keep them inside).
LLAVA_OP(LlavaEmbedding) {
  int wt = weight_type(dtypes[0]);
  if (nparam != 3 || wt < 0 || strcmp(dtypes[1], "int32") || ndims[0] != 2) return 1;
  ensure_init();
  int64_t V = shapes[0][0], D = shapes[0][1], n = 1;
  for (int i = 0; i < ndims[1]; i++) n *= shapes[1][i];
  const int32_t* ids = (const int32_t*)params[1];
  float* out = (float*)params[2];
  parallel_blocks(n, 64, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; i++) {
      float* row = out + i * D;
      if (ids[i] < 0 || ids[i] >= V) { memset(row, 0, sizeof(float) * D); continue; }
      if (wt == WT_F32) memcpy(row, (const float*)params[0] + ids[i] * D, sizeof(float) * D);
      else if (wt == WT_F16) for (int64_t d = 0; d < D; d++) row[d] = f16_to_f32(((const uint16_t*)params[0])[ids[i] * D + d]);
      else for (int64_t d = 0; d < D; d++) row[d] = bf16_to_f32(((const uint16_t*)params[0])[ids[i] * D + d]);
    }
  });
  return 0;
}

// The same multiply on plain buffers (tests and benchmarks); wt: 0 float32, 1 float16, 2 bfloat16.
int llava_matmul(const float* x, const void* w, int wt, float* y, int64_t M, int64_t N, int64_t K) {
  return dispatch(x, w, wt, y, M, N, K);
}

// Where to find MindSpore's libdnnl.so.3 if it is not loaded yet.
void llava_set_onednn_path(const char* path) { onednn::library_path = path ? path : ""; }

// Force the paths (tests, benchmarks): small in {"scalar", "avx2", "avx512", "avx512bf16"} (a path the CPU lacks
// falls back to the next one down), large in {"packed", "onednn", "decode"} ("packed" needs AVX512-BF16, else it
// is "onednn"); "" or a negative m_large: unchanged.
int llava_configure(const char* small, const char* large, int64_t m_large) {
  ensure_init();
  static const char* small_names[] = {"scalar", "avx2", "avx512", "avx512bf16"};
  if (small && *small) {
    int path = -1;
    for (int i = 0; i < 4; i++) if (!strcmp(small, small_names[i])) path = i;
    if (path < 0) return -1;
    g.small_path = path;
  }
  if (large && *large) {
    if (!strcmp(large, "onednn")) g.large_path = LP_ONEDNN;
    else if (!strcmp(large, "decode")) g.large_path = LP_DECODE;
    else if (!strcmp(large, "packed")) g.large_path = g.cpu.avx512bf16 ? LP_PACKED : LP_ONEDNN;
    else return -2;
  }
  if (m_large >= 0) g.m_large = m_large;
  return 0;
}

// The row count from which products take the prompt path (oneDNN), as configured.
int64_t llava_prompt_rows() {
  ensure_init();
  return g.m_large;
}

// Back to the paths chosen at load (after llava_configure).
void llava_reset_paths() {
  ensure_init();
  default_paths();
}

// What this CPU and library will do, in one line.
const char* llava_describe() {
  ensure_init();
  static const char* small_names[] = {"scalar", "avx2", "avx512", "avx512bf16"};
  static char line[400];
  bool have_onednn = onednn::available();
  std::string bf16_on = g.cpu.amx ? "AMX" : g.cpu.avx512bf16 ? "AVX512-BF16" : "";
  std::string onednn = !have_onednn ? "decode kernels (oneDNN: " + onednn::api.error + ")"
                                    : "oneDNN " + onednn::api.version_string;
  std::string large =
      g.large_path == LP_DECODE ? "decode kernels"
      : g.large_path == LP_PACKED ? "16-bit weights: packed bfloat16 kernels; float32 weights, attention: " + onednn +
                                        (have_onednn ? " (16-bit models' attention: bfloat16 on " + bf16_on + ")" : "")
      : onednn + (!have_onednn ? "" : bf16_on.empty() ? " (float32)" : " (16-bit weights: bfloat16 on " + bf16_on + ")");
  snprintf(line, sizeof line, "decode %s; prompts (%ld+ rows) %s; %d threads",
           small_names[best_small_path_up_to(g.small_path)], (long)g.m_large, large.c_str(), g.nthreads);
  return line;
}

// Index of the first element that is not finite (NaN or infinity), or -1; wt as for llava_matmul.
int64_t llava_first_nonfinite(const void* data, int64_t n, int wt) {
  ensure_init();
  const int64_t block = 1 << 16;
  std::atomic<int64_t> first{-1};
  auto scan = [&](int64_t a, int64_t b) {  // all-ones exponent: infinity or NaN
    int64_t found = -1;
    if (wt == WT_F32) {
      const uint32_t* p = (const uint32_t*)data;
      for (int64_t i = a; i < b && found < 0; i++) if ((p[i] & 0x7f800000u) == 0x7f800000u) found = i;
    } else {
      const uint16_t* p = (const uint16_t*)data;
      uint16_t exponent = wt == WT_F16 ? 0x7c00 : 0x7f80;
      bool any = false;
      for (int64_t i = a; i < b; i++) any |= (p[i] & exponent) == exponent;  // vectorizes: no early exit
      if (any) for (int64_t i = a; i < b && found < 0; i++) if ((p[i] & exponent) == exponent) found = i;
    }
    if (found >= 0) {
      int64_t current = first.load();
      while ((current < 0 || found < current) && !first.compare_exchange_weak(current, found)) {}
    }
  };
  parallel_blocks(n, block, scan);
  return first.load();
}

void llava_release_scratch() { g_x_scratch.release(); g_w_scratch.release(); }

}  // extern "C"
