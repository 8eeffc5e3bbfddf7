// `dpo bench` (train/bench.cpp): one fast run on the tiny shape with a tiny custom workload. Checks the JSON's
// fields, the token count, the FLOP formula against a hand computation, that the timed steps moved the weights,
// the written JSON file, and flag validation. Also the per-kernel table's CPU side (runtime/kernel_trace.h):
// aggregation, ordering, shares and name shortening on synthetic records, and `--kernels` refused off the GPU.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/error.h"
#include "runtime/kernel_trace.h"
#include "train/bench.h"
#include "train/config.h"

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

// Peak memory per phase (phase_peak_memory): on the CPU every timed phase has a host figure and no device figure
// (the CPU backend counts host buffers only); each holds at least what the step keeps throughout (the policy's
// weights and gradients, AdamW's two moments and the step's gradient: 5 F32 vectors of N); the forward's peak is
// at least the backward's, because in fp32 on the CPU the backward allocates nothing (the forward makes every
// activation and gradient-scratch buffer, GPT2::ensure_acts), so the backward's peak is the bytes alive when it
// starts, all of which were alive during the forward (and in the timed steps it adds nothing above that); and
// recomputation lowers the forward's peak (2 layers: one
// block's buffers plus two kept outputs instead of two blocks).
TEST(Bench, PeakMemoryPerPhase) {
  BenchOptions o;
  o.shape = "tiny";
  o.workload = "custom";
  o.prompt_len = 9, o.chosen_len = 6, o.rejected_len = 5;
  o.pairs = 2, o.steps = 1, o.warmup = 1;
  o.threads = 1;
  o.print_table = false;
  auto forward_peak = [](const json& r) {
    return r["phase_peak_memory"]["policy_forward_fused_head"]["host_bytes"].get<double>();
  };
  const json r = run_bench(o);
  const double N = r["shape"]["parameters"].get<double>();
  for (const char* k : {"batch_and_zero", "reference_forward", "policy_forward_fused_head", "loss", "backward",
                        "optimizer"}) {
    SCOPED_TRACE(k);
    ASSERT_TRUE(r["phase_peak_memory"].contains(k));
    const json& e = r["phase_peak_memory"][k];
    EXPECT_TRUE(e["device_bytes"].is_null());
    EXPECT_TRUE(e["device_added_bytes"].is_null());
    EXPECT_GE(e["host_added_bytes"].get<double>(), 0);
    EXPECT_LE(e["host_added_bytes"].get<double>(), e["host_bytes"].get<double>());
    EXPECT_GE(e["host_bytes"].get<double>(), 5 * 4 * N);
    EXPECT_LE(e["host_bytes"].get<double>(), r["peak_tensor_bytes"].get<double>());
  }
  EXPECT_FALSE(r["phase_peak_memory"].contains("other"));
  EXPECT_TRUE(r["peak_device_tensor_bytes"].is_null());
  EXPECT_GE(forward_peak(r), r["phase_peak_memory"]["backward"]["host_bytes"].get<double>());
  // In the steady state the backward allocates nothing.
  EXPECT_EQ(r["phase_peak_memory"]["backward"]["host_added_bytes"].get<double>(), 0);
  EXPECT_NE(format_bench_table(r).find("peak memory per phase"), std::string::npos);
  o.gradient_checkpointing = 1;
  EXPECT_LT(forward_peak(run_bench(o)), forward_peak(r));
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
  EXPECT_EQ(r["rows"].get<int64_t>(), 10);
  EXPECT_EQ(r["padded_tokens_per_step"].get<int64_t>(), 10 * longest);

  // prefix_shared in one row: each pair's segment is prompt | chosen | dup | rejected (kernels/batch_layout.h), so
  // the row holds sum(p + c + 1 + j) slots; the real tokens counted are the same as padded's
  o.batch_layout = "prefix_shared";
  o.max_tokens_per_row = 1000;
  int64_t segs = 0;
  for (int64_t i = 0; i < 5; ++i) segs += len(20, i) + len(11, 5 * i + 3) + 1 + len(9, 11 * i + 7);
  const json rp = run_bench(o);
  EXPECT_EQ(rp["tokens_per_step"].get<int64_t>(), tokens);
  EXPECT_EQ(rp["rows"].get<int64_t>(), 1);
  EXPECT_EQ(rp["padded_len"].get<int64_t>(), segs);
  EXPECT_EQ(rp["padded_tokens_per_step"].get<int64_t>(), segs);
  EXPECT_EQ(rp["slots_used_per_step"].get<int64_t>(), segs);
  o.batch_layout = "padded";
  o.max_tokens_per_row = 0;
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

// --attention-only on the CPU backend times its blocked kernels (eager only: the flash kernels are CUDA's). Tiny sizes,
// one T a multiple of nothing (37) and one above a key tile (70). The FLOP figures are recomputed here from the
// convention's formula (forward 4*B*H*T^2*d/2, forward + backward 3.5x that) and the reported medians.
TEST(Bench, AttentionOnlyOnCpu) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("dpo_test_bench_attn_" + std::to_string(::getpid()) + ".json"))
                               .string();
  BenchOptions o;
  o.attention_only = true;
  o.seq_lens = {37, 70};
  o.attn_batch = 2, o.attn_heads = 3, o.attn_head_dim = 16;
  o.steps = 3, o.warmup = 0;
  o.threads = 1;
  o.json_path = path;
  o.command_line = "dpo bench --attention-only (test)";
  o.print_table = false;
  const json r = run_bench(o);
  for (const char* k : {"schema", "date", "git_commit", "command_line", "machine", "device", "backend", "mode",
                        "causal", "precision", "batch", "heads", "head_dim", "seq_lens", "warmup", "steps", "timing",
                        "flops_convention", "results"})
    EXPECT_TRUE(r.contains(k)) << k;
  EXPECT_EQ(r["schema"], "dpo-bench-attention-1");
  EXPECT_EQ(r["backend"], "cpu");
  EXPECT_EQ(r["precision"], "bf16");
  EXPECT_EQ(r["warmup"], 1);  // at least one untimed run
  ASSERT_EQ(r["results"].size(), 2u);  // one implementation (eager) per T on the CPU
  for (size_t i = 0; i < 2; ++i) {
    const json& row = r["results"][i];
    SCOPED_TRACE(row.dump());
    ASSERT_FALSE(row.contains("error"));
    const int64_t T = o.seq_lens[i];
    EXPECT_EQ(row["T"], T);
    EXPECT_EQ(row["implementation"], "eager");
    EXPECT_EQ(row["forward_times_s"].size(), 3u);
    EXPECT_EQ(row["forward_backward_times_s"].size(), 3u);
    const double f = row["forward_s"].get<double>(), fb = row["forward_backward_s"].get<double>();
    EXPECT_GT(f, 0);
    EXPECT_GT(fb, 0);
    EXPECT_DOUBLE_EQ(row["backward_s"].get<double>(), fb - f);
    auto ts = row["forward_times_s"].get<std::vector<double>>();
    std::sort(ts.begin(), ts.end());
    EXPECT_DOUBLE_EQ(f, ts[1]);  // the median of three
    const double flops = 4.0 * 2 * 3 * static_cast<double>(T * T) * 16 / 2;
    EXPECT_NEAR(row["forward_tflops"].get<double>(), flops / f / 1e12, 1e-9 * flops / f / 1e12);
    EXPECT_NEAR(row["forward_backward_tflops"].get<double>(), 3.5 * flops / fb / 1e12, 1e-9 * 3.5 * flops / fb / 1e12);
  }
  std::ifstream in(path);
  ASSERT_TRUE(in.good());
  const json file = json::parse(in);
  EXPECT_EQ(file["results"].size(), 2u);
  std::filesystem::remove(path);

  // Flag validation: InputError naming the flag.
  const auto refused = [](BenchOptions b, const std::string& needle) {
    try {
      run_bench(b);
      ADD_FAILURE() << "no error; expected one naming " << needle;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  BenchOptions bad = o;
  bad.json_path.clear();
  bad.seq_lens = {};
  refused(bad, "--seq-lens");
  bad.seq_lens = {16, 0};
  refused(bad, "--seq-lens");
  bad.seq_lens = {16};
  bad.attn_head_dim = 0;
  refused(bad, "--attn-head-dim");
  bad.attn_head_dim = 16;
  bad.steps = 0;
  refused(bad, "--steps");
}

// The full-step bench's --attn-implementation: flash needs CUDA and bf16 (InputError naming the flag).
TEST(Bench, FlashAttentionRefusedOnCpu) {
  BenchOptions o;
  o.shape = "tiny";
  o.print_table = false;
  o.attn_implementation = "flash";
  o.precision = "bf16";
  try {
    run_bench(o);
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("--attn-implementation"), std::string::npos) << e.what();
  }
  o.attn_implementation = "sdpa";
  EXPECT_THROW(run_bench(o), InputError);
}

// --kernels reads CUPTI on a GPU: on the CPU it is bad usage (InputError naming the flag and what it needs), before
// any model is built, and the CLI exits with status 2.
TEST(Bench, KernelsRefusedOnCpu) {
  BenchOptions o;
  o.shape = "tiny";
  o.workload = "custom";
  o.prompt_len = 4, o.chosen_len = 3, o.rejected_len = 3;
  o.steps = 1, o.warmup = 0;
  o.print_table = false;
  o.kernels = true;
  try {
    run_bench(o);
    ADD_FAILURE() << "--kernels on cpu was accepted";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("--kernels"), std::string::npos) << m;
    EXPECT_NE(m.find("--device cuda"), std::string::npos) << m;
    EXPECT_NE(m.find("CUDA build"), std::string::npos) << m;
  }

  const std::string dpo = std::string(DPO_BINARY_DIR) + "/dpo";
  if (!std::filesystem::exists(dpo)) {
    ADD_FAILURE() << "the dpo binary is not built: " << dpo;
    return;
  }
  const std::string err =
      (std::filesystem::temp_directory_path() / ("dpo_test_bench_err_" + std::to_string(::getpid()))).string();
  const std::string cmd =
      "'" + dpo + "' bench --device cpu --shape tiny --steps 1 --warmup 0 --kernels >/dev/null 2>'" + err + "'";
  const int st = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(st)) << cmd;
  EXPECT_EQ(WEXITSTATUS(st), 2) << cmd;
  std::ifstream f(err);
  std::stringstream text;
  text << f.rdbuf();
  EXPECT_NE(text.str().find("--kernels needs --device cuda and a CUDA build"), std::string::npos) << text.str();
  std::remove(err.c_str());
}

TEST(Bench, KernelTraceOffByDefault) {
  BenchOptions o;
  o.shape = "tiny";
  o.workload = "custom";
  o.prompt_len = 4, o.chosen_len = 3, o.rejected_len = 3;
  o.steps = 1, o.warmup = 0;
  o.threads = 1;
  o.print_table = false;
  json r = run_bench(o);
  EXPECT_TRUE(r["kernels"].is_null());
  EXPECT_EQ(r["kernel_trace"]["status"], "not requested (--kernels)");
  EXPECT_EQ(format_bench_table(r).find("GPU time by kernel"), std::string::npos);

  // The printed table of a traced run comes from the JSON alone (format_bench_table), as a GPU run writes it.
  r["kernels"] = json::array({{{"name", "nvjet_gemm"}, {"full_name", "nvjet_gemm"}, {"kind", "kernel"},
                               {"calls", 2}, {"total_ms", 3.0}, {"mean_us", 1500.0}, {"share", 0.75}},
                              {{"name", "[memset]"}, {"full_name", "[memset]"}, {"kind", "memset"},
                               {"calls", 4}, {"total_ms", 1.0}, {"mean_us", 250.0}, {"share", 0.25}, {"bytes", 64}}});
  r["kernel_trace"] = {{"status", "ok"},          {"gpu_time_ms", 4.0},       {"kernel_time_ms", 3.0},
                       {"timed_wall_ms", 8.0},     {"gpu_busy_fraction", 0.5}, {"warnings", json::array()}};
  const std::string text = format_bench_table(r);
  EXPECT_NE(text.find("GPU time by kernel"), std::string::npos) << text;
  EXPECT_LT(text.find("nvjet_gemm"), text.find("[memset]")) << text;
  EXPECT_NE(text.find(" 75.00%"), std::string::npos) << text;
  EXPECT_NE(text.find("50.0% of the timed steps' wall time"), std::string::npos) << text;
  r["kernels"] = nullptr;
  r["kernel_trace"] = {{"status", "unavailable"}, {"error", "cuptiActivityEnable(...) failed: test"}};
  EXPECT_NE(format_bench_table(r).find("not available: cuptiActivityEnable(...) failed: test"), std::string::npos);
}

// Name shortening. The mangled names are written by hand from the Itanium C++ ABI and their demangled forms
// checked with binutils' c++filt (not with our code): a template kernel in a namespace, one in an anonymous
// namespace, a CUTLASS-style kernel whose template argument is qualified, a plain function, and cuBLAS-style names
// that were never mangled.
TEST(KernelTable, ShortensNames) {
  EXPECT_EQ(demangle_kernel_name("_ZN3dpo4cuda19gelu_forward_kernelIfEEvPT_PKS2_l"),
            "void dpo::cuda::gelu_forward_kernel<float>(float*, float const*, long)");
  EXPECT_EQ(shorten_kernel_name("_ZN3dpo4cuda19gelu_forward_kernelIfEEvPT_PKS2_l"), "gelu_forward_kernel<float>");
  EXPECT_EQ(shorten_kernel_name("_ZN3dpo4cuda19gelu_forward_kernelI13__nv_bfloat16EEvPT_PKS3_l"),
            "gelu_forward_kernel<bf16>");
  EXPECT_EQ(shorten_kernel_name("_ZN3dpo4cuda12_GLOBAL__N_114softmax_kernelILi4EEEvPfi"), "softmax_kernel<4>");
  EXPECT_EQ(shorten_kernel_name("_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIfEEEEvNT_6ParamsE"),
            "device_kernel<GemmUniversal<float>>");
  EXPECT_EQ(shorten_kernel_name("_ZN3dpo4cuda10add_kernelEPfl"), "add_kernel");
  EXPECT_EQ(shorten_kernel_name("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NNT"),
            "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NNT");
  // Not a valid mangling: kept as it is (and still cut).
  EXPECT_EQ(demangle_kernel_name("_Zbroken"), "_Zbroken");
  const std::string xmma =
      "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_"
      "cublas";
  const std::string cut = shorten_kernel_name(xmma, 40);
  EXPECT_EQ(cut.size(), 40u);
  EXPECT_EQ(cut, xmma.substr(0, 37) + "...");
  EXPECT_EQ(shorten_kernel_name(xmma, 1000), xmma);
}

// Aggregation over synthetic records: calls and nanoseconds summed per name, untimed records left out and counted,
// rows sorted by total time (ties by name), shares summing to 1, copies and sets as their own rows with bytes.
TEST(KernelTable, AggregatesSortsAndShares) {
  KernelStats st;
  const std::string gelu = "_ZN3dpo4cuda19gelu_forward_kernelIfEEvPT_PKS2_l";
  const std::string gemm = "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NNT";
  const std::string ln = "_ZN3dpo4cuda10add_kernelEPfl";
  // gelu: 3 calls of 1000, 1500, 2500 ns = 5000 ns; gemm: 2 calls of 9000 ns = 18000 ns; add_kernel: 5000 ns in one
  // call (ties with gelu: "add_kernel" sorts first); memcpy HtoD: 2 calls, 1200 ns, 4096 + 1024 bytes; memset 800 ns.
  uint64_t t = 1'000'000;
  auto rec = [&](GpuActivityKind k, const std::string& name, uint64_t dur, uint64_t bytes = 0) {
    st.add(k, name, t, t + dur, bytes);
    t += dur + 100;
  };
  rec(GpuActivityKind::Kernel, gelu, 1000);
  rec(GpuActivityKind::Kernel, gemm, 9000);
  rec(GpuActivityKind::Memcpy, "[memcpy HtoD]", 700, 4096);
  rec(GpuActivityKind::Kernel, gelu, 1500);
  rec(GpuActivityKind::Kernel, ln, 5000);
  rec(GpuActivityKind::Memset, "[memset]", 800, 512);
  rec(GpuActivityKind::Kernel, gemm, 9000);
  rec(GpuActivityKind::Memcpy, "[memcpy HtoD]", 500, 1024);
  rec(GpuActivityKind::Kernel, gelu, 2500);
  st.add(GpuActivityKind::Kernel, gelu, 0, 0);       // no timestamps
  st.add(GpuActivityKind::Kernel, gemm, 5000, 4000);  // end before start
  const KernelTable tab = st.table();

  ASSERT_EQ(tab.rows.size(), 5u);
  const std::vector<std::string> order = {gemm, "add_kernel", "gelu_forward_kernel<float>", "[memcpy HtoD]",
                                          "[memset]"};
  for (size_t i = 0; i < order.size(); ++i) EXPECT_EQ(tab.rows[i].name, order[i]) << i;
  EXPECT_EQ(tab.rows[0].calls, 2);
  EXPECT_DOUBLE_EQ(tab.rows[0].total_ms, 18000e-6);
  EXPECT_DOUBLE_EQ(tab.rows[0].mean_us, 9.0);
  EXPECT_EQ(tab.rows[2].calls, 3);
  EXPECT_DOUBLE_EQ(tab.rows[2].total_ms, 5000e-6);
  EXPECT_NEAR(tab.rows[2].mean_us, 5.0 / 3.0, 1e-12);
  EXPECT_EQ(tab.rows[2].full_name, "void dpo::cuda::gelu_forward_kernel<float>(float*, float const*, long)");
  EXPECT_EQ(tab.rows[3].kind, GpuActivityKind::Memcpy);
  EXPECT_EQ(tab.rows[3].calls, 2);
  EXPECT_EQ(tab.rows[3].bytes, 5120u);
  EXPECT_EQ(tab.rows[4].kind, GpuActivityKind::Memset);
  EXPECT_EQ(tab.rows[4].bytes, 512u);

  const double total_ns = 5000 + 18000 + 5000 + 1200 + 800;
  EXPECT_DOUBLE_EQ(tab.total_ms, total_ns * 1e-6);
  EXPECT_DOUBLE_EQ(tab.kernel_ms, 28000e-6);
  double sum = 0;
  for (const auto& r : tab.rows) sum += r.share;
  EXPECT_NEAR(sum, 1.0, 1e-12);
  EXPECT_NEAR(tab.rows[0].share, 18000 / total_ns, 1e-15);
  EXPECT_EQ(tab.records, 3 + 2 + 1 + 2 + 1);
  EXPECT_EQ(tab.untimed_records, 2);
  ASSERT_EQ(tab.warnings.size(), 1u);
  EXPECT_NE(tab.warnings[0].find("2 activities had no timestamps"), std::string::npos);

  // The text: rows in order, the per-step column, and the rest summed when rows are cut.
  const std::string full = format_kernel_table(tab, 30, 3);
  size_t last = 0;
  for (const auto& n : order) {
    const size_t at = full.find(n);
    ASSERT_NE(at, std::string::npos) << n << "\n" << full;
    EXPECT_GT(at, last) << n;
    last = at;
  }
  EXPECT_NE(full.find("ms/step"), std::string::npos);
  EXPECT_NE(full.find(" 60.00%"), std::string::npos) << full;  // 18000 / 30000
  const std::string cut = format_kernel_table(tab, 2);
  EXPECT_EQ(cut.find("[memset]"), std::string::npos);
  EXPECT_NE(cut.find(" 6 calls in 3 more rows"), std::string::npos) << cut;
  EXPECT_NE(format_kernel_table(KernelTable{}).find("no GPU activity"), std::string::npos);
}

// Without CUDA and CUPTI at build time the trace is a stub that says why; with them, built() is true (the trace
// itself is tested on a GPU in tests/test_cuda_kernel_trace.cpp).
TEST(KernelTable, TraceAvailabilityIsExplained) {
  std::string why;
  const bool ok = KernelTrace::built(&why);
#ifdef DPO_HAVE_CUDA
  if (!ok) EXPECT_NE(why.find("CUPTI"), std::string::npos) << why;
#else
  EXPECT_FALSE(ok);
  EXPECT_NE(why.find("CUDA"), std::string::npos) << why;
  KernelTrace tr;
  EXPECT_FALSE(tr.start().empty());
  EXPECT_TRUE(tr.stop().rows.empty());
#endif
  if (ok) EXPECT_TRUE(why.empty());
}

// profile_steps (train/config.h): "A-B" or "N", 1-based, A <= B, device cuda only; anything else is an InputError
// naming the key.
TEST(ProfileSteps, ParsesAndValidates) {
  const StepRange r = parse_profile_steps("10-12");
  EXPECT_EQ(r.first, 10);
  EXPECT_EQ(r.last, 12);
  EXPECT_FALSE(r.contains(9));
  EXPECT_TRUE(r.contains(10));
  EXPECT_TRUE(r.contains(12));
  EXPECT_FALSE(r.contains(13));
  const StepRange one = parse_profile_steps("7");
  EXPECT_EQ(one.first, 7);
  EXPECT_EQ(one.last, 7);
  EXPECT_TRUE(parse_profile_steps("").empty());
  EXPECT_FALSE(parse_profile_steps("").contains(1));
  for (const char* bad : {"0", "0-3", "12-10", "-3", "3-", "a-b", "1-2-3", "1..3", " 4", "99999999999999999999"}) {
    try {
      parse_profile_steps(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("profile_steps"), std::string::npos) << e.what();
    }
  }
  const std::vector<std::string> base = {"model=m", "train_file=t.jsonl", "out_dir=o"};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> o = base;
    o.insert(o.end(), extra.begin(), extra.end());
    return load_train_config("", o, RunKind::Dpo);
  };
  EXPECT_EQ(with({"device=cuda", "profile_steps=10-12"}).profile_steps, "10-12");
  EXPECT_EQ(with({"device=cuda", "profile_steps=3"}).profile_steps, "3");
  EXPECT_TRUE(with({}).profile_steps.empty());
  for (const std::vector<std::string>& bad : std::vector<std::vector<std::string>>{
           {"device=cuda", "profile_steps=12-10"}, {"device=cpu", "profile_steps=1-2"}, {"profile_steps=x"}}) {
    try {
      with(bad);
      ADD_FAILURE() << "accepted " << bad.back();
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("key 'profile_steps'"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
