// Kernel timings behind docs/performance.md ("CPU hot spots", 2026-12-06): AdamW (dry run + update, the
// optimizer's per-step work) and attention forward + backward at the bench shapes, one call per repetition,
// the median and range of the repetitions printed. Built against either build's libdpo_kernels_cpu.a:
//   g++ -O2 -fopenmp -I<src> kernel_bench.cpp <build>/libdpo_kernels_cpu.a -lopenblas -o kb [-DWITH_TILED]
//   OMP_WAIT_POLICY=passive OMP_NUM_THREADS=2 ./kb adamw|attn-small|attn-124m|gelu-small [reps]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/gelu.h"

using namespace dpo;
using clk = std::chrono::steady_clock;

static double secs(clk::time_point a, clk::time_point b) { return std::chrono::duration<double>(b - a).count(); }

static void report(const char* what, std::vector<double> t) {
  std::sort(t.begin(), t.end());
  std::printf("%-28s median %.4f s  min %.4f  max %.4f  (n=%zu)\n", what, t[t.size() / 2], t.front(), t.back(),
              t.size());
}

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "adamw";
  const int reps = argc > 2 ? std::atoi(argv[2]) : 7;
  std::mt19937_64 g(1);
  std::normal_distribution<float> N(0.f, 1.f);
  if (what == "adamw") {
    const int64_t n = 30339456;  // the small shape's parameter count
    std::vector<float> p(n), gr(n), m(n, 0.f), v(n, 0.f);
    for (int64_t i = 0; i < n; ++i) p[i] = 0.02f * N(g), gr[i] = 1e-3f * N(g);
    std::vector<AdamWSegment> segs = {{0, n / 2, true}, {n / 2, n - n / 2, false}};
    AdamWParams hp;
    hp.lr = 1e-4;
    hp.weight_decay = 0.01;
    std::vector<double> tdry, tupd;
    for (int r = 0; r < reps; ++r) {
      hp.step = r + 1;
      auto t0 = clk::now();
      AdamWCheck c = cpu::adamw_dry_run_segments<float>(p.data(), gr.data(), m.data(), v.data(), n, segs.data(), 2, hp);
      auto t1 = clk::now();
      cpu::adamw_update_segments<float>(p.data(), gr.data(), m.data(), v.data(), n, segs.data(), 2, hp);
      auto t2 = clk::now();
      if (c != AdamWCheck::AllFinite) std::printf("unexpected non-finite\n");
      tdry.push_back(secs(t0, t1));
      tupd.push_back(secs(t1, t2));
    }
    report("adamw dry run (30.3M)", tdry);
    report("adamw update (30.3M)", tupd);
    return 0;
  }
  if (what == "gelu-small") {  // one layer's MLP activation at the small shape: 4 rows x 240 x 4*384
    const int64_t n = 4 * 240 * 4 * 384;
    std::vector<float> x(n), y(n), dx(n, 0.f);
    for (auto& e : x) e = N(g);
    std::vector<double> tf, tb;
    for (int r = 0; r < reps; ++r) {
      auto t0 = clk::now();
      cpu::gelu_forward<float>(y.data(), x.data(), n);
      auto t1 = clk::now();
      cpu::gelu_backward<float>(dx.data(), y.data(), x.data(), n);
      auto t2 = clk::now();
      tf.push_back(secs(t0, t1));
      tb.push_back(secs(t1, t2));
    }
    report("gelu forward (1.47M)", tf);
    report("gelu backward (1.47M)", tb);
    return 0;
  }
  // attention: one layer at the bench's shape (rows of 240 tokens, the last 20 of the rejected rows padded)
  const bool small = what == "attn-small";
  const int64_t B = small ? 4 : 2, T = 240, C = small ? 384 : 768, NH = small ? 6 : 12;
  std::vector<float> qkv(B * T * 3 * C), dout(B * T * C), out(B * T * C), att(B * NH * T * T), dqkv(qkv.size());
  for (auto& x : qkv) x = N(g);
  for (auto& x : dout) x = N(g);
  std::vector<int32_t> mask(B * T, 1);
  for (int64_t b = 1; b < B; b += 2)
    for (int64_t t = 220; t < T; ++t) mask[b * T + t] = 0;
  std::vector<double> rf, rb;
  for (int r = 0; r < reps; ++r) {
    auto t0 = clk::now();
    cpu::attention_forward<float>(out.data(), att.data(), qkv.data(), mask.data(), B, T, C, NH);
    auto t1 = clk::now();
    cpu::attention_backward<float>(dqkv.data(), dout.data(), qkv.data(), att.data(), B, T, C, NH);
    auto t2 = clk::now();
    rf.push_back(secs(t0, t1));
    rb.push_back(secs(t1, t2));
  }
  report("reference forward", rf);
  report("reference backward", rb);
#ifdef WITH_TILED
  std::vector<float> lse(B * NH * T);
  std::vector<double> tf, tb;
  for (int r = 0; r < reps; ++r) {
    auto t0 = clk::now();
    cpu::attention_tiled_forward<float>(out.data(), lse.data(), qkv.data(), mask.data(), B, T, C, NH);
    auto t1 = clk::now();
    cpu::attention_tiled_backward<float>(dqkv.data(), dout.data(), qkv.data(), mask.data(), lse.data(), B, T, C, NH);
    auto t2 = clk::now();
    tf.push_back(secs(t0, t1));
    tb.push_back(secs(t1, t2));
  }
  report("tiled forward", tf);
  report("tiled backward", tb);
#endif
  return 0;
}
