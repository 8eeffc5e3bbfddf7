// `dpo bench` (train/bench.cpp): one fast run on the tiny shape with a tiny custom workload. Checks the JSON's
// fields, the token count, the FLOP formula against a hand computation, that the timed steps moved the weights,
// the written JSON file, and flag validation.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "runtime/backend.h"
#include "runtime/error.h"
#include "train/bench.h"

namespace {

using namespace dpo;
using json = nlohmann::json;

std::vector<float> host_params(const GPT2& m) {
  Tensor h = Tensor::host(m.params().shape(), DType::F32);
  m.backend().copy_to_host(h, m.params());
  return std::vector<float>(h.data<float>(), h.data<float>() + h.numel());
}

TEST(Bench, TinyCustomWorkload) {
  const std::string path =
      (std::filesystem::temp_directory_path() / ("dpo_test_bench_" + std::to_string(::getpid()) + ".json")).string();
  BenchOptions o;
  o.shape = "tiny";
  o.workload = "custom";
  o.prompt_len = 8, o.chosen_len = 5, o.rejected_len = 4;
  o.pairs = 2, o.steps = 2, o.warmup = 1;
  o.threads = 1;
  o.json_path = path;
  o.command_line = "dpo bench (test)";
  o.print_table = false;
  std::vector<float> before, after;
  o.inspect = [&](const GPT2& m, bool done) { (done ? after : before) = host_params(m); };
  const json r = run_bench(o);

  for (const char* k :
       {"schema", "date", "machine", "git_commit", "command_line", "device", "backend", "threads", "shape",
        "workload", "reference", "pairs", "rows", "warmup_steps", "timed_steps", "tokens_per_step", "padded_len",
        "mean_seq_len", "step_seconds", "step_seconds_median", "step_seconds_min", "step_seconds_max",
        "tokens_per_second", "pairs_per_second", "phase_seconds_median", "phase_seconds", "phase_timing",
        "flops_formula", "flops_per_step", "achieved_flops_per_second", "peak_tflops", "mfu", "peak_rss_mib",
        "device_memory_used_mib"})
    EXPECT_TRUE(r.contains(k)) << k;
  for (const char* k : {"uname", "nproc", "cpu_model"}) EXPECT_TRUE(r["machine"].contains(k)) << k;
  for (const char* k :
       {"batch_and_zero", "reference_forward", "policy_forward_fused_head", "loss", "backward", "optimizer",
        "other"}) {
    EXPECT_TRUE(r["phase_seconds_median"].contains(k)) << k;
    EXPECT_EQ(r["phase_seconds"][k].size(), 2u) << k;
  }
  EXPECT_EQ(r["shape"]["n_layer"], 2);
  EXPECT_EQ(r["shape"]["n_embd"], 128);
  EXPECT_EQ(r["shape"]["n_head"], 4);
  EXPECT_EQ(r["step_seconds"].size(), 2u);
  EXPECT_GT(r["step_seconds_median"].get<double>(), 0);
  EXPECT_TRUE(r["mfu"].is_null());  // CPU without --peak-tflops
  EXPECT_GT(r["peak_rss_mib"].get<double>(), 0);
  EXPECT_EQ(r["optimizer_steps"], 3);

  // 2P rows: P chosen rows of 8+5 tokens and P rejected rows of 8+4 tokens.
  EXPECT_EQ(r["tokens_per_step"], 2 * (8 + 5) + 2 * (8 + 4));
  EXPECT_EQ(r["padded_len"], 13);
  EXPECT_EQ(r["padded_tokens_per_step"], 4 * 13);

  // 12 * P * T * (N + L*d*T), T = 50/4 = 12.5, N = V*d + maxT*d + L*(12 d^2 + 13 d) + 2d.
  const double d = 128, L = 2, V = 50257, maxT = 1024, P = 2, T = 12.5;
  const double N = V * d + maxT * d + L * (12 * d * d + 13 * d) + 2 * d;
  EXPECT_EQ(r["shape"]["parameters"].get<double>(), N);
  EXPECT_DOUBLE_EQ(r["mean_seq_len"].get<double>(), T);
  EXPECT_DOUBLE_EQ(r["flops_per_step"].get<double>(), 12 * P * T * (N + L * d * T));
  EXPECT_DOUBLE_EQ(r["achieved_flops_per_second"].get<double>(),
                   r["flops_per_step"].get<double>() / r["step_seconds_median"].get<double>());
  EXPECT_DOUBLE_EQ(r["tokens_per_second"].get<double>(), 50 / r["step_seconds_median"].get<double>());

  // The timed steps updated the weights.
  ASSERT_EQ(before.size(), static_cast<size_t>(N));
  ASSERT_EQ(after.size(), before.size());
  size_t changed = 0;
  for (size_t i = 0; i < before.size(); ++i) changed += before[i] != after[i];
  EXPECT_GT(changed, before.size() / 2);

  // The JSON file holds the same document.
  std::ifstream f(path);
  ASSERT_TRUE(f.good());
  const json w = json::parse(f);
  EXPECT_EQ(w["flops_per_step"], r["flops_per_step"]);
  EXPECT_EQ(w["step_seconds"], r["step_seconds"]);
  std::remove(path.c_str());
}

TEST(Bench, LiveReferenceFlopsAndPeak) {
  BenchOptions o;
  o.shape = "tiny";
  o.workload = "custom";
  o.prompt_len = 4, o.chosen_len = 3, o.rejected_len = 3;
  o.pairs = 1, o.steps = 1, o.warmup = 0;
  o.threads = 1;
  o.reference = "live";
  o.peak_tflops = 1.0;
  o.print_table = false;
  const json r = run_bench(o);
  const double d = 128, L = 2, T = 7;
  const double N = r["shape"]["parameters"].get<double>();
  EXPECT_DOUBLE_EQ(r["flops_per_step"].get<double>(), 16 * 1 * T * (N + L * d * T));
  EXPECT_DOUBLE_EQ(r["mfu"].get<double>(), r["achieved_flops_per_second"].get<double>() / 1e12);
  EXPECT_FALSE(format_bench_table(r).empty());
}

// --length-spread lognormal: lengths are the means times quantiles of LogNormal(-s^2/2, s), s = 0.4, at
// (k + 0.5)/16, indexed k = i (prompt), 5i + 3 (chosen), 11i + 7 (rejected) mod 16. The expected token count is
// computed here from the distribution itself (inverse normal CDF by bisection on erfc), not from the table in
// bench.cpp, so a wrong table entry or index shows.
TEST(Bench, LogNormalLengthSpread) {
  auto quantile = [](double q) {  // standard normal inverse CDF by bisection
    double lo = -10, hi = 10;
    for (int it = 0; it < 200; ++it) {
      const double mid = 0.5 * (lo + hi);
      (0.5 * std::erfc(-mid / std::sqrt(2.0)) < q ? lo : hi) = mid;
    }
    return 0.5 * (lo + hi);
  };
  const double s = 0.4;
  auto mult = [&](int64_t k) { return std::exp(-s * s / 2 + s * quantile((static_cast<double>(k % 16) + 0.5) / 16)); };
  auto len = [&](int64_t mean, int64_t k) {
    // the table holds 4 decimals: allow for that rounding by computing with the rounded multiplier
    const double m = std::floor(mult(k) * 1e4 + 0.5) / 1e4;
    return std::max<int64_t>(1, static_cast<int64_t>(std::floor(static_cast<double>(mean) * m + 0.5)));
  };
  BenchOptions o;
  o.shape = "tiny";
  o.workload = "custom";
  o.prompt_len = 20, o.chosen_len = 11, o.rejected_len = 9;
  o.pairs = 5, o.steps = 1, o.warmup = 0;
  o.threads = 1;
  o.length_spread = "lognormal";
  o.print_table = false;
  const json r = run_bench(o);
  int64_t tokens = 0, longest = 0;
  for (int64_t i = 0; i < 5; ++i) {
    const int64_t p = len(20, i), c = len(11, 5 * i + 3), j = len(9, 11 * i + 7);
    tokens += 2 * p + c + j;
    longest = std::max(longest, p + std::max(c, j));
  }
  EXPECT_EQ(r["tokens_per_step"].get<int64_t>(), tokens);
  EXPECT_EQ(r["padded_len"].get<int64_t>(), longest);
  EXPECT_EQ(r["workload"]["length_spread"], "lognormal");
  o.length_spread = "uniform";
  EXPECT_THROW(run_bench(o), InputError);
}

TEST(Bench, RejectsBadFlags) {
  BenchOptions o;
  o.print_table = false;
  o.shape = "huge";
  EXPECT_THROW(run_bench(o), InputError);
  o.shape = "tiny";
  o.workload = "custom";  // lengths missing
  EXPECT_THROW(run_bench(o), InputError);
  o.workload = "hh";
  o.pairs = 0;
  EXPECT_THROW(run_bench(o), InputError);
  o.pairs = 1;
  o.reference = "cached";
  EXPECT_THROW(run_bench(o), InputError);
  o.reference = "precomputed";
  o.workload = "custom", o.prompt_len = 1000, o.chosen_len = 30, o.rejected_len = 1;  // > n_positions
  EXPECT_THROW(run_bench(o), InputError);
}

}  // namespace
