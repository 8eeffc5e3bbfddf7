// The single-precision GEMMs of one `dpo bench` step (fp32, precomputed reference: one policy forward and
// backward) timed one by one through CBLAS, for comparing BLAS libraries and OpenBLAS core types.
//
// Rows M = 2 * pairs * padded length (hh workload, 2 pairs: 4 rows of 150 + 90 = 240 tokens -> 960). Per
// transformer layer: the four linear layers forward (A[M,K] B[K,N]), their input gradients (dout W^T) and weight
// gradients (inp^T dout); once per step: the LM head against the tied embedding [V, d] forward (NT), its input
// gradient (NN, K = V) and its weight gradient (TN, M = V). Each GEMM runs until 0.25 s and 3 calls have passed;
// the median call is reported. "step_gemm_s" weights each median by how often a step runs it.
//
// Build (either library; the source uses only cblas_sgemm and the BLAS's own identification call):
//   g++ -O2 -fopenmp gemm_shapes.cpp -o gemm_openblas -DUSE_OPENBLAS \
//       -L/usr/lib/x86_64-linux-gnu/openblas-openmp -Wl,-rpath,/usr/lib/x86_64-linux-gnu/openblas-openmp -lopenblas
//   g++ -O2 -fopenmp gemm_shapes.cpp -o gemm_blis -DUSE_BLIS \
//       -L/usr/lib/x86_64-linux-gnu/blis-openmp -Wl,-rpath,/usr/lib/x86_64-linux-gnu/blis-openmp -lblis
// Run: gemm_openblas <label> <d> [<M>]   (d = 384 for --shape small, 768 for gpt2-124m)
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

extern "C" {
enum CBLAS_ORDER { CblasRowMajor = 101 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112 };
void cblas_sgemm(CBLAS_ORDER, CBLAS_TRANSPOSE, CBLAS_TRANSPOSE, int, int, int, float, const float*, int,
                 const float*, int, float, float*, int);
#ifdef USE_OPENBLAS
char* openblas_get_corename(void);
char* openblas_get_config(void);
#endif
#ifdef USE_BLIS
typedef int arch_t;
arch_t bli_arch_query_id(void);
const char* bli_arch_string(arch_t);
const char* bli_info_get_version_str(void);
#endif
}

struct Shape {
  const char* name;
  bool ta, tb;
  int M, N, K;
  int per_step;
};

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s label d [M]\n", argv[0]);
    return 2;
  }
  const std::string label = argv[1];
  const int d = std::atoi(argv[2]);
  const int M = argc > 3 ? std::atoi(argv[3]) : 960;
  const int L = d == 384 ? 6 : d == 768 ? 12 : 1;
  const int V = 50257;
  const std::vector<Shape> shapes = {
      {"qkv_fwd", false, false, M, 3 * d, d, L},        {"attn_proj_fwd", false, false, M, d, d, L},
      {"fc_fwd", false, false, M, 4 * d, d, L},         {"mlp_proj_fwd", false, false, M, d, 4 * d, L},
      {"qkv_dinp", false, true, M, d, 3 * d, L},        {"qkv_dw", true, false, d, 3 * d, M, L},
      {"attn_proj_dinp", false, true, M, d, d, L},      {"attn_proj_dw", true, false, d, d, M, L},
      {"fc_dinp", false, true, M, d, 4 * d, L},         {"fc_dw", true, false, d, 4 * d, M, L},
      {"mlp_proj_dinp", false, true, M, 4 * d, d, L},   {"mlp_proj_dw", true, false, 4 * d, d, M, L},
      {"lm_head_fwd", false, true, M, V, d, 1},         {"lm_head_dinp", false, false, M, d, V, 1},
      {"lm_head_dw", true, false, V, d, M, 1},
  };
  std::string lib;
#ifdef USE_OPENBLAS
  lib = std::string(openblas_get_config()) + " core " + openblas_get_corename();
#endif
#ifdef USE_BLIS
  lib = std::string("BLIS ") + bli_info_get_version_str() + " arch " + bli_arch_string(bli_arch_query_id());
#endif
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  size_t most = 0;
  for (const auto& s : shapes) most = std::max({most, size_t(s.M) * s.K, size_t(s.K) * s.N, size_t(s.M) * s.N});
  std::vector<float> A(most), B(most), C(most);
  for (auto& x : A) x = u(gen);
  for (auto& x : B) x = u(gen);
  double step = 0;
  std::printf("{\"label\": \"%s\", \"library\": \"%s\", \"threads\": %d, \"d\": %d, \"M\": %d, \"gemms\": [\n",
              label.c_str(), lib.c_str(), omp_get_max_threads(), d, M);
  for (size_t i = 0; i < shapes.size(); ++i) {
    const Shape& s = shapes[i];
    const int lda = s.ta ? s.M : s.K, ldb = s.tb ? s.K : s.N;
    auto call = [&] {
      cblas_sgemm(CblasRowMajor, s.ta ? CblasTrans : CblasNoTrans, s.tb ? CblasTrans : CblasNoTrans, s.M, s.N, s.K,
                  1.f, A.data(), lda, B.data(), ldb, 0.f, C.data(), s.N);
    };
    call();  // warm-up (packing buffers, thread pool)
    std::vector<double> t;
    const auto start = std::chrono::steady_clock::now();
    while (t.size() < 3 || std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 0.25) {
      const auto a = std::chrono::steady_clock::now();
      call();
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
    }
    std::sort(t.begin(), t.end());
    const double med = t[t.size() / 2];
    step += med * s.per_step;
    std::printf("  {\"name\": \"%s\", \"M\": %d, \"N\": %d, \"K\": %d, \"trans\": \"%c%c\", \"calls\": %zu, "
                "\"median_s\": %.6f, \"min_s\": %.6f, \"gflops\": %.2f, \"per_step\": %d}%s\n",
                s.name, s.M, s.N, s.K, s.ta ? 'T' : 'N', s.tb ? 'T' : 'N', t.size(), med, t.front(),
                2.0 * s.M * s.N * s.K / med * 1e-9, s.per_step, i + 1 < shapes.size() ? "," : "");
  }
  std::printf("], \"step_gemm_s\": %.6f}\n", step);
  return 0;
}
