#include "train/bench.h"

#include <omp.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <vector>

#ifdef DPO_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "runtime/cuda/nvtx.h"
#endif

#include "runtime/backend.h"
#include "runtime/blas_info.h"
#include "runtime/error.h"
#include "runtime/kernel_trace.h"
#include "runtime/rng.h"
#include "train/data.h"
#include "train/loss.h"
#include "train/optim.h"
#include "train/reference.h"

namespace dpo {

using json = nlohmann::json;

namespace {

const char* const kPhases[] = {"batch_and_zero", "reference_forward", "policy_forward_fused_head", "loss",
                               "backward",       "optimizer",         "other"};
constexpr int kNumPhases = 7;

std::string run_cmd(const char* cmd) {
  std::string out;
  if (FILE* f = ::popen(cmd, "r")) {
    char buf[512];
    while (std::fgets(buf, sizeof buf, f)) out += buf;
    if (::pclose(f) != 0) return "";
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) {
      auto c = line.find(':');
      if (c != std::string::npos) {
        std::string v = line.substr(c + 1);
        v.erase(0, v.find_first_not_of(" \t"));
        return v;
      }
    }
  return "unknown";
}

int online_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
  return static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
}

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char b[64];
  std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return b;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct Lengths {
  int64_t prompt, chosen, rejected;
};

Lengths workload_lengths(const BenchOptions& o) {
  if (o.workload == "hh") return {150, 90, 70};
  if (o.workload == "tldr") return {512, 35, 35};
  if (o.workload == "long") return {768, 256, 256};
  if (o.workload == "custom") {
    if (o.prompt_len <= 0 || o.chosen_len <= 0 || o.rejected_len <= 0)
      throw InputError("--workload custom needs --prompt-len, --chosen-len and --rejected-len, each > 0");
    return {o.prompt_len, o.chosen_len, o.rejected_len};
  }
  throw InputError("--workload: unknown value '" + o.workload + "'; valid: hh, tldr, long, custom");
}

// --length-spread lognormal: the 16 quantiles (k + 0.5)/16 of a log-normal with sigma 0.4 and mean 1, so a
// pair's lengths are the workload's means times one of these (prompt, chosen and rejected take different entries
// for the same pair). A fixed table, not random draws: tools/bench_torch.py has the same table and the same
// indexing, so both tools build batches of identical lengths.
constexpr double kLogNormalQuantiles[16] = {0.4382, 0.5449, 0.6163, 0.6767, 0.7322, 0.7859, 0.8396, 0.8946,
                                            0.9525, 1.0150, 1.0843, 1.1638, 1.2593, 1.3826, 1.5639, 1.9447};

Lengths pair_lengths(const Lengths& mean, const std::string& spread, int64_t i) {
  if (spread == "none") return mean;
  auto at = [&](int64_t mean_len, int64_t k) {
    return std::max<int64_t>(1, static_cast<int64_t>(std::floor(static_cast<double>(mean_len) *
                                                                     kLogNormalQuantiles[k % 16] + 0.5)));
  };
  return {at(mean.prompt, i), at(mean.chosen, 5 * i + 3), at(mean.rejected, 11 * i + 7)};
}

std::unique_ptr<Backend> bench_backend(const BenchOptions& o) {
  if (o.device == "cuda") {
#ifdef DPO_HAVE_CUDA
    return make_cuda_backend(0);
#else
    throw InputError("--device cuda: this build has no CUDA backend (nvcc was not found at configure time)");
#endif
  }
  if (o.device != "cpu") throw InputError("--device: unknown value '" + o.device + "'; valid: cpu, cuda");
  return make_cpu_backend(o.threads);
}

// cudaMemGetInfo total - free, in MiB (device-wide, at the time of the call); negative when unavailable.
double device_used_mib(const BenchOptions& o) {
#ifdef DPO_HAVE_CUDA
  if (o.device == "cuda") {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) return static_cast<double>(total_b - free_b) / (1 << 20);
  }
#else
  (void)o;
#endif
  return -1;
}

json num_or_null(double v, bool ok) { return ok ? json(v) : json(nullptr); }

// One NVTX range per bench phase, named as the phase (Nsight Systems shows them; ncu --nvtx-include selects by them).
// A phase's range closes after the synchronize that ends it, so it covers the phase's GPU work.
void phase_range_push(const char* name) {
#ifdef DPO_HAVE_CUDA
  nvtxRangePushA(name);
#else
  (void)name;
#endif
}
void phase_range_pop() {
#ifdef DPO_HAVE_CUDA
  nvtxRangePop();
#endif
}

const char* activity_kind_name(GpuActivityKind k) {
  switch (k) {
    case GpuActivityKind::Kernel: return "kernel";
    case GpuActivityKind::Memcpy: return "memcpy";
    case GpuActivityKind::Memset: return "memset";
  }
  return "?";
}

json kernel_rows_json(const KernelTable& t) {
  json rows = json::array();
  for (const auto& r : t.rows) {
    json j = {{"name", r.name},         {"calls", r.calls},     {"total_ms", r.total_ms}, {"mean_us", r.mean_us},
              {"share", r.share},       {"kind", activity_kind_name(r.kind)}, {"full_name", r.full_name}};
    if (r.kind != GpuActivityKind::Kernel) j["bytes"] = r.bytes;
    rows.push_back(std::move(j));
  }
  return rows;
}

// The rows of a run_bench result back into a KernelTable, for format_kernel_table.
KernelTable kernel_table_from_json(const json& r) {
  KernelTable t;
  for (const auto& j : r["kernels"]) {
    KernelTableRow row;
    const std::string kind = j["kind"].get<std::string>();
    row.kind = kind == "memcpy"   ? GpuActivityKind::Memcpy
               : kind == "memset" ? GpuActivityKind::Memset
                                  : GpuActivityKind::Kernel;
    row.name = j["name"].get<std::string>();
    row.full_name = j["full_name"].get<std::string>();
    row.calls = j["calls"].get<int64_t>();
    row.total_ms = j["total_ms"].get<double>();
    row.mean_us = j["mean_us"].get<double>();
    row.share = j["share"].get<double>();
    t.records += row.calls;
    t.rows.push_back(std::move(row));
  }
  const json& kt = r["kernel_trace"];
  t.total_ms = kt["gpu_time_ms"].get<double>();
  t.kernel_ms = kt["kernel_time_ms"].get<double>();
  for (const auto& w : kt["warnings"]) t.warnings.push_back(w.get<std::string>());
  return t;
}

}  // namespace

GPT2Config bench_shape(const std::string& name) {
  GPT2Config c;
  c.vocab_size = 50257;
  c.max_seq_len = 1024;
  if (name == "tiny") c.n_layer = 2, c.n_embd = 128, c.n_head = 4;
  else if (name == "small") c.n_layer = 6, c.n_embd = 384, c.n_head = 6;
  else if (name == "gpt2-124m") c.n_layer = 12, c.n_embd = 768, c.n_head = 12;
  else if (name == "gpt2-350m") c.n_layer = 24, c.n_embd = 1024, c.n_head = 16;
  else {
    // The Llama family (HF config.json values of the named models; n_positions kept at 4096, which bounds only
    // the rotary tables and the workload's lengths here).
    auto llama = [&](const char* type, int64_t L, int64_t C, int64_t H, int64_t KV, int64_t I, int64_t V, bool tied,
                     double theta) {
      c.arch = Arch::Llama;
      c.model_type = type;
      c.n_layer = L, c.n_embd = C, c.n_head = H, c.n_kv_head = KV, c.intermediate_size = I, c.vocab_size = V;
      c.tie_word_embeddings = tied;
      c.rope_theta = theta;
      c.attention_bias = std::string(type) == "qwen2";
      c.ln_eps = 1e-5;
      c.max_seq_len = 4096;
    };
    if (name == "llama-tiny") llama("llama", 2, 128, 4, 2, 352, 50257, false, 10000);
    else if (name == "smollm-135m") llama("llama", 30, 576, 9, 3, 1536, 49152, true, 10000);
    else if (name == "smollm-360m") llama("llama", 32, 960, 15, 5, 2560, 49152, true, 10000);
    else if (name == "qwen2-0.5b") llama("qwen2", 24, 896, 14, 2, 4864, 151936, true, 1000000);
    else if (name == "llama-1b") {  // Llama 3.2 1B
      llama("llama", 16, 2048, 32, 8, 8192, 128256, true, 500000);
      c.rope_scaling = RopeScaling{32, 1, 4, 8192};
    } else {
      throw InputError("--shape: unknown value '" + name +
                       "'; valid: tiny, small, gpt2-124m, gpt2-350m, llama-tiny, smollm-135m, smollm-360m, "
                       "qwen2-0.5b, llama-1b");
    }
  }
  c.validate("--shape " + name);
  return c;
}

json run_bench(const BenchOptions& o) {
  if (o.attention_only) return run_attention_bench(o);
  // --- validation -------------------------------------------------------------------------------------------
  if (o.attn_implementation != "eager" && o.attn_implementation != "flash")
    throw InputError("--attn-implementation: unknown value '" + o.attn_implementation + "'; valid: eager, flash");
  if (o.attn_implementation == "flash" && (o.device != "cuda" || o.precision != "bf16"))
    throw InputError("--attn-implementation flash needs --device cuda --precision bf16 (fp32 is the parity mode), "
                     "got --device " + o.device + " --precision " + o.precision);
  const GPT2Config mc = bench_shape(o.shape);
  const Lengths len = workload_lengths(o);
  if (o.pairs <= 0) throw InputError("--pairs must be > 0");
  if (o.steps <= 0) throw InputError("--steps must be > 0");
  if (o.warmup < 0) throw InputError("--warmup must be >= 0");
  if (o.reference != "precomputed" && o.reference != "live")
    throw InputError("--reference: unknown value '" + o.reference + "'; valid: precomputed, live");
  if (o.length_spread != "none" && o.length_spread != "lognormal")
    throw InputError("--length-spread: unknown value '" + o.length_spread + "'; valid: none, lognormal");
  if (o.kernels) {
    if (o.device != "cuda")
      throw InputError("--kernels needs --device cuda and a CUDA build (it reads per-kernel GPU times from CUPTI); "
                       "got --device " + o.device);
    std::string why;
    if (!KernelTrace::built(&why)) throw InputError("--kernels: " + why);
  }
  for (int64_t i = 0; i < o.pairs; ++i) {
    const Lengths l = pair_lengths(len, o.length_spread, i);
    if (l.prompt + std::max(l.chosen, l.rejected) > mc.max_seq_len)
      throw InputError("workload: pair " + std::to_string(i) + ": prompt + longest completion (" +
                       std::to_string(l.prompt + std::max(l.chosen, l.rejected)) + ") exceeds n_positions " +
                       std::to_string(mc.max_seq_len) + (o.length_spread == "none" ? "" : " (--length-spread)"));
  }
  const bool live = o.reference == "live";
  const bool cuda = o.device == "cuda";
  double peak = o.peak_tflops;
  if (peak < 0) peak = cuda ? 989.0 : 0.0;  // 0: none

  auto be = bench_backend(o);
  if (o.attn_implementation == "flash") {
    try {
      be->set_attention_impl(AttentionImpl::Flash);
    } catch (const Error& e) {
      throw InputError(std::string("--attn-implementation flash: ") + e.what());
    }
  }
  const int threads_used = cuda ? 0 : omp_get_max_threads();

  // --- model, data --------------------------------------------------------------------------------------------
  BatchShape shape;
  if (o.batch_layout == "padded") shape.layout = BatchLayout::Padded;
  else if (o.batch_layout == "packed") shape.layout = BatchLayout::Packed;
  else if (o.batch_layout == "prefix_shared") shape.layout = BatchLayout::PrefixShared;
  else throw InputError("--batch-layout: unknown value '" + o.batch_layout + "'; valid: padded, packed, prefix_shared");
  if (o.max_tokens_per_row < 0) throw InputError("--max-tokens-per-row must be >= 0");
  shape.max_tokens_per_row = o.max_tokens_per_row;
  if (shape.max_tokens_per_row == 0)  // twice the longest padded row: a row holds about one pair's both sequences
    for (int64_t i = 0; i < o.pairs; ++i) {
      const Lengths l = pair_lengths(len, o.length_spread, i);
      shape.max_tokens_per_row = std::max(shape.max_tokens_per_row, 2 * (l.prompt + std::max(l.chosen, l.rejected)));
    }
  Rng rng(o.seed);
  if (o.logits_chunk_rows < 1) throw InputError("--logits-chunk-rows must be >= 1");
  if (o.gradient_checkpointing < 0)
    throw InputError("--gradient-checkpointing must be >= 0 (0 = off), got " +
                     std::to_string(o.gradient_checkpointing));
  if (o.precision != "fp32" && o.precision != "bf16")
    throw InputError("--precision: unknown value '" + o.precision + "'; valid: fp32, bf16");
  const DType mdt = o.precision == "bf16" ? DType::BF16 : DType::F32;
  GPT2 policy(*be, mc, mdt);
  policy.init_random(rng);
  policy.set_logits_chunk_rows(o.logits_chunk_rows);
  policy.set_gradient_checkpointing(o.gradient_checkpointing);
  const HeadRows head_rows = o.head_compaction ? HeadRows::Scored : HeadRows::All;
  policy.set_head_rows(head_rows);
  std::unique_ptr<GPT2> ref;
  if (live) {
    ref = std::make_unique<GPT2>(*be, mc, mdt);
    ref->set_logits_chunk_rows(o.logits_chunk_rows);
    ref->set_gradient_checkpointing(o.gradient_checkpointing);
    ref->set_head_rows(head_rows);
    be->copy(ref->master_params(), policy.master_params());  // the reference starts as the policy, as in a real run
    ref->sync_params();
  }
  std::vector<PreferencePair> data(static_cast<size_t>(o.pairs));
  const auto V = static_cast<uint64_t>(mc.vocab_size);
  for (size_t q = 0; q < data.size(); ++q) {
    const Lengths l = pair_lengths(len, o.length_spread, static_cast<int64_t>(q));
    auto& p = data[q];
    for (int64_t i = 0; i < l.prompt; ++i) p.prompt.push_back(static_cast<int32_t>(rng.below(V)));
    for (int64_t i = 0; i < l.chosen; ++i) p.chosen.push_back(static_cast<int32_t>(rng.below(V)));
    for (int64_t i = 0; i < l.rejected; ++i) p.rejected.push_back(static_cast<int32_t>(rng.below(V)));
  }
  // Fixed "precomputed" reference log-probs: about what a random-init model gives (-ln V per token).
  std::vector<double> ref_c(data.size()), ref_r(data.size());
  for (size_t i = 0; i < data.size(); ++i) {
    const double lv = std::log(static_cast<double>(V));
    ref_c[i] = -lv * static_cast<double>(data[i].chosen.size()) * (1 + 0.01 * rng.normal());
    ref_r[i] = -lv * static_cast<double>(data[i].rejected.size()) * (1 + 0.01 * rng.normal());
  }
  std::vector<int64_t> idx(static_cast<size_t>(o.pairs));
  for (int64_t i = 0; i < o.pairs; ++i) idx[static_cast<size_t>(i)] = i;

  LossConfig lc;  // sigmoid, beta 0.1
  OptimConfig oc;
  AdamW opt(*be, policy.specs(), policy.params().numel(), DType::F32, oc, o.warmup + o.steps);
  const int64_t n_params = policy.params().numel();
  Tensor grad = be->empty({n_params}, DType::F32);
  const PairLossParams loss_params = pair_loss_params(lc);
  const Tensor sums_dev = be->empty({kPairSumsWidth}, DType::F64);
  // CUDA graphs (the trainer's cuda_graphs): the batch is the same every step, so its device copies are made once
  // and the policy's forward, loss and backward are captured on the second step and replayed from then on.
  bool graphs = cuda && o.cuda_graphs && shape.layout == BatchLayout::Padded;
  std::string graph_note;  // why graphs were turned off (a failed capture), for the JSON
  Tensor g_tokens, g_keymask, g_targets, g_weights, g_ref;
  std::unique_ptr<Backend::Graph> graph;
  int64_t graph_runs = 0;

  // --- one step, as run_training does it ------------------------------------------------------------------------
  using clk = std::chrono::steady_clock;
  int64_t tokens_total = 0, padded_T = 0, slots_used = 0, rows = 0;
  double last_loss = 0, last_grad_norm = 0;
  auto step = [&](std::array<double, kNumPhases>& ph) -> double {
    be->synchronize();
    const auto t0 = clk::now();
    auto t = t0;
    auto mark = [&](int k) {
      if (cuda) be->synchronize();
      const auto n = clk::now();
      ph[static_cast<size_t>(k)] = std::chrono::duration<double>(n - t).count();
      t = n;
      phase_range_pop();
      if (k + 1 < 6) phase_range_push(kPhases[k + 1]);
    };
    ph.fill(0);
    phase_range_push(kPhases[0]);
    Batch b = shape.make(data, idx, DType::F32);
    slots_used = b.slots_used;
    rows = b.tokens.size(0);
    tokens_total = b.tokens_total;
    padded_T = b.T;
    be->fill_zero(grad);
    policy.zero_grad();
    mark(0);
    const int64_t P = b.pairs;
    // The reference's log-probs on the device: a forward pass of the live reference, or the fixed values uploaded.
    Tensor ref_dev;
    const LayoutScope ref_scope(live ? *ref : policy, b), policy_scope(policy, b);
    if (live) {
      ref_dev = be->empty({2 * P}, DType::F32);
      ref->score(to_backend(*be, b.tokens), to_backend(*be, b.keymask), to_backend(*be, b.targets),
                 to_backend(*be, b.weights), ref_dev, Tensor(), b.weights);
    } else {
      Tensor h = Tensor::host({2 * P}, DType::F32);
      const PairRows rows = b.layout == BatchLayout::Padded ? PairRows::Blocked : PairRows::Interleaved;
      for (int64_t p = 0; p < P; ++p) {  // b.indices: the batch's pair order (packing may reorder)
        const auto i = static_cast<size_t>(b.indices[static_cast<size_t>(p)]);
        h.data<float>()[pair_row(rows, P, p, 0)] = static_cast<float>(ref_c[i]);
        h.data<float>()[pair_row(rows, P, p, 1)] = static_cast<float>(ref_r[i]);
      }
      ref_dev = to_backend(*be, h);
    }
    mark(1);
    // The trainer's step: the loss on the device inside the chunked LM head (GPT2::fused_forward_pairs).
    GPT2::PairLossHead head;
    head.params = loss_params;
    head.normalizer = static_cast<double>(P);
    head.sums = sums_dev;
    bool backward_done = false;
    if (graphs) {
      backward_done = true;  // the graph (or the eager run of its work) holds the backward
      if (!g_tokens.defined()) {
        g_tokens = to_backend(*be, b.tokens), g_keymask = to_backend(*be, b.keymask);
        g_targets = to_backend(*be, b.targets), g_weights = to_backend(*be, b.weights);
        g_ref = be->empty({2 * P}, DType::F32);
      }
      be->copy(g_ref, ref_dev);
      head.ref_logp = g_ref;
      auto work = [&policy, &g_tokens, &g_keymask, &g_targets, &g_weights, head] {
        policy.fused_forward_pairs(g_tokens, g_keymask, g_targets, g_weights, head);
        policy.fused_backward();
      };
      if (graph) {
        graph->replay();
      } else if (graph_runs >= 1) {
        try {
          graph = be->capture(work);
          graph->replay();
        } catch (const GraphCaptureError& e) {  // nothing ran: run eagerly from now on
          graph_note = e.what();
          std::fprintf(stderr, "dpo bench: warning: %s; running without CUDA graphs\n", e.what());
          graphs = false;
          work();
        }
      } else {
        work();
      }
      ++graph_runs;
    } else {
      head.ref_logp = ref_dev;
      head.host_weights = b.weights;  // the scored slots (HeadRows::Scored)
      policy.fused_forward_pairs(to_backend(*be, b.tokens), to_backend(*be, b.keymask), to_backend(*be, b.targets),
                                 to_backend(*be, b.weights), head);
    }
    mark(2);
    // The step's one read of the loss and its metrics (the trainer reads every micro-batch's row in one copy).
    const std::vector<double> sums = to_host_f64(*be, sums_dev);
    last_loss = sums[kSumLoss] / static_cast<double>(P);
    mark(3);
    if (!backward_done) policy.fused_backward();
    be->residual_forward(grad, grad, policy.grads());  // the trainer's accumulate() on rank 0
    mark(4);
    AdamW::StepInfo info = opt.step(policy.master_params(), grad);
    if (!info.skipped) policy.sync_params();
    last_grad_norm = info.grad_norm;
    mark(5);
    be->synchronize();
    const double total = std::chrono::duration<double>(clk::now() - t0).count();
    double sum = 0;
    for (int k = 0; k < 6; ++k) sum += ph[static_cast<size_t>(k)];
    ph[6] = std::max(0.0, total - sum);
    return total;
  };

  std::array<double, kNumPhases> ph{};
  for (int64_t i = 0; i < o.warmup; ++i) step(ph);
  if (o.inspect) o.inspect(policy, false);
  // The timed steps only: inside the profiler capture range and, with --kernels, the CUPTI trace (started after the
  // device is idle, so nothing from the warm-up or the inspect hook is counted; stopped after a synchronize, so
  // every traced activity has finished).
  be->synchronize();
  if (cuda) profiler_capture_start();
  KernelTrace trace;
  std::string trace_error;
  if (o.kernels) {
    trace_error = trace.start();
    if (!trace_error.empty())
      std::fprintf(stderr, "dpo bench: --kernels: CUPTI could not start: %s; running without the kernel table\n",
                   trace_error.c_str());
  }
  std::vector<double> times;
  std::vector<std::vector<double>> phases(kNumPhases);
  for (int64_t i = 0; i < o.steps; ++i) {
    times.push_back(step(ph));
    for (int k = 0; k < kNumPhases; ++k) phases[static_cast<size_t>(k)].push_back(ph[static_cast<size_t>(k)]);
  }
  be->synchronize();
  KernelTable ktable;
  if (trace.running()) ktable = trace.stop();
  if (cuda) profiler_capture_stop();
  if (o.inspect) o.inspect(policy, true);
  const double dev_mib = device_used_mib(o);

  // --- numbers ------------------------------------------------------------------------------------------------
  const double med = median(times);
  const double P = static_cast<double>(o.pairs);
  const double T = static_cast<double>(tokens_total) / (2 * P);  // mean real length of the 2P rows
  const double N = static_cast<double>(mc.num_parameters());
  const double L = static_cast<double>(mc.n_layer), d = static_cast<double>(mc.n_embd);
  const double coef = live ? 16 : 12;
  const double flops = coef * P * T * (N + L * d * T);
  const double achieved = flops / med;
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  const double rss_mib = static_cast<double>(ru.ru_maxrss) / 1024.0;  // Linux: KiB

  json r;
  r["schema"] = "dpo-bench-1";
  r["date"] = utc_now();
  const std::string git = run_cmd("git rev-parse HEAD 2>/dev/null");
  r["git_commit"] = git.empty() ? "unknown" : git;
  r["command_line"] = o.command_line;
  r["machine"] = {{"uname", run_cmd("uname -a")}, {"nproc", online_cpus()}, {"cpu_model", cpu_model()}};
  r["device"] = o.device;
  r["backend"] = be->name();
  r["threads"] = {{"requested", o.threads}, {"used", cuda ? json(nullptr) : json(threads_used)}};
  // The kernels the CPU backend's GEMMs ran (runtime/blas_info.h); a CUDA run's GEMMs are cuBLAS's.
  r["cpu_kernels"] = cuda ? json(nullptr) : current_kernel_set().to_json();
  r["dtype"] = o.precision == "bf16" ? "BF16 (F32 master weights, gradients, optimizer state)" : "F32";
  r["precision"] = o.precision;
  r["attn_implementation"] = o.attn_implementation;
  r["seed"] = o.seed;
  r["shape"] = {{"name", o.shape},          {"n_layer", mc.n_layer},        {"n_embd", mc.n_embd},
                {"n_head", mc.n_head},      {"vocab_size", mc.vocab_size}, {"n_positions", mc.max_seq_len},
                {"parameters", mc.num_parameters()}, {"model_type", mc.model_type}};
  if (mc.arch == Arch::Llama) {
    r["shape"]["n_kv_head"] = mc.kv_heads();
    r["shape"]["intermediate_size"] = mc.mlp_width();
    r["shape"]["tie_word_embeddings"] = mc.tied_head();
  }
  r["workload"] = {{"name", o.workload},
                   {"prompt_len", len.prompt},
                   {"chosen_len", len.chosen},
                   {"rejected_len", len.rejected},
                   {"length_spread", o.length_spread},
                   {"lengths", "exact (every pair the same lengths; no log-normal draw)"}};
  r["reference"] = o.reference;
  r["logits_chunk_rows"] = o.logits_chunk_rows;
  r["gradient_checkpointing"] = o.gradient_checkpointing;
  r["cuda_graphs"] = graphs;
  r["head_compaction"] = o.head_compaction;
  if (!graph_note.empty()) r["cuda_graphs_note"] = graph_note;
  r["logits_buffer_elements"] = policy.logits_buffer_numel();
  r["loss"] = "sigmoid, beta 0.1";
  r["optimizer"] = "AdamW lr 5e-7, max_grad_norm 1, constant schedule";
  r["pairs"] = o.pairs;
  r["rows"] = rows;  // rows the model ran: 2 * pairs padded, fewer with a batch layout
  r["warmup_steps"] = o.warmup;
  r["timed_steps"] = o.steps;
  r["tokens_per_step"] = tokens_total;
  r["padded_len"] = padded_T;
  r["padded_tokens_per_step"] = rows * padded_T;  // token slots, padding (and prefix copies) included
  r["batch_layout"] = batch_layout_name(shape.layout);
  r["max_tokens_per_row"] = shape.layout == BatchLayout::Padded ? 0 : shape.max_tokens_per_row;
  r["batch_rows"] = rows;
  r["slots_per_step"] = rows * padded_T;  // token slots the model ran, padding included
  r["slots_used_per_step"] = slots_used;  // slots holding a token (prefix sharing: each prompt once, plus one)
  r["mean_seq_len"] = T;
  r["step_seconds"] = times;
  r["step_seconds_median"] = med;
  r["step_seconds_min"] = *std::min_element(times.begin(), times.end());
  r["step_seconds_max"] = *std::max_element(times.begin(), times.end());
  r["tokens_per_second"] = static_cast<double>(tokens_total) / med;
  r["pairs_per_second"] = P / med;
  json pm = json::object(), praw = json::object();
  for (int k = 0; k < kNumPhases; ++k) {
    pm[kPhases[k]] = median(phases[static_cast<size_t>(k)]);
    praw[kPhases[k]] = phases[static_cast<size_t>(k)];
  }
  r["phase_seconds_median"] = pm;
  r["phase_seconds"] = praw;
  r["phase_timing"] = cuda ? "host steady_clock with backend.synchronize() at every phase boundary (not CUDA events)"
                           : "host steady_clock (CPU: synchronous, exact)";
  std::ostringstream fs;
  fs << (live ? "16" : "12") << "*P*T*(N + L*d*T), P=" << o.pairs << " T=" << T << " N=" << mc.num_parameters()
     << " L=" << mc.n_layer << " d=" << mc.n_embd;
  r["flops_formula"] = fs.str();
  r["flops_per_step"] = flops;
  r["achieved_flops_per_second"] = achieved;
  r["achieved_tflops"] = achieved / 1e12;
  r["peak_tflops"] = num_or_null(peak, peak > 0);
  r["mfu"] = num_or_null(achieved / (peak * 1e12), peak > 0);
  r["peak_rss_mib"] = rss_mib;
  // The CPU backend's tensors are counted host buffers (runtime/tensor.h): their peak over the whole run (setup,
  // warm-up and timed steps), what `dpo plan` predicts. On a GPU the host buffers are only staging: null.
  const bool counted = !cuda;
  r["peak_tensor_bytes"] = num_or_null(static_cast<double>(host_memory_stats().peak), counted);
  r["device_memory_used_mib"] = num_or_null(dev_mib, dev_mib >= 0);
  r["device_memory_note"] = "cudaMemGetInfo total - free after the timed steps (device-wide, not a peak); null on CPU";
  r["last_loss"] = last_loss;
  r["last_grad_norm"] = last_grad_norm;
  r["optimizer_steps"] = opt.step_count();
  double timed_s = 0;
  for (double t : times) timed_s += t;
  json kt = {{"source", "CUPTI activity records (CONCURRENT_KERNEL, MEMCPY, MEMSET) over the timed steps; each "
                        "kernel's start and end on the GPU"}};
  if (!o.kernels) {
    kt["status"] = "not requested (--kernels)";
    r["kernels"] = nullptr;
  } else if (!trace_error.empty()) {
    kt["status"] = "unavailable";
    kt["error"] = trace_error;
    r["kernels"] = nullptr;
  } else {
    kt["status"] = "ok";
    kt["gpu_time_ms"] = ktable.total_ms;
    kt["kernel_time_ms"] = ktable.kernel_ms;
    kt["timed_wall_ms"] = timed_s * 1e3;
    // One stream, so the activities do not overlap: summed GPU time over the wall time is the fraction of the timed
    // steps the GPU was busy (the rest is host work, launch gaps and the bench's phase synchronizations).
    kt["gpu_busy_fraction"] = num_or_null(ktable.total_ms / (timed_s * 1e3), timed_s > 0);
    kt["activities"] = ktable.records;
    kt["untimed_activities"] = ktable.untimed_records;
    kt["dropped_activities"] = ktable.dropped_records;
    kt["warnings"] = ktable.warnings;
    kt["note"] = "step times of a --kernels run include CUPTI's per-launch overhead; take step times from a run "
                 "without --kernels";
    r["kernels"] = kernel_rows_json(ktable);
  }
  r["kernel_trace"] = kt;

  if (o.print_table) std::fputs(format_bench_table(r).c_str(), stdout);
  if (!o.json_path.empty()) {
    std::ofstream f(o.json_path);
    if (!f) throw InputError("--json: cannot write " + o.json_path);
    f << r.dump(2) << "\n";
    if (!f) throw InputError("--json: write failed for " + o.json_path);
  }
  return r;
}

namespace {

// The wall time of each of `steps` runs of fn after max(warmup, 1) untimed ones: CUDA events on the backend's stream
// around each run (then the end event is waited for), or steady_clock around fn + synchronize on the CPU.
std::vector<double> time_runs(Backend& be, bool cuda, int64_t warmup, int64_t steps, const std::function<void()>& fn) {
  for (int64_t i = 0; i < std::max<int64_t>(warmup, 1); ++i) fn();
  be.synchronize();
  std::vector<double> t;
#ifdef DPO_HAVE_CUDA
  if (cuda) {
    const auto check = [](cudaError_t e, const char* what) {
      if (e != cudaSuccess) throw Error(std::string("dpo bench --attention-only: ") + what + ": " + cudaGetErrorString(e));
    };
    struct Events {
      cudaEvent_t a = nullptr, b = nullptr;
      ~Events() {
        if (a) cudaEventDestroy(a);
        if (b) cudaEventDestroy(b);
      }
    } ev;
    check(cudaEventCreate(&ev.a), "cudaEventCreate");
    check(cudaEventCreate(&ev.b), "cudaEventCreate");
    auto stream = static_cast<cudaStream_t>(be.native_stream());
    for (int64_t i = 0; i < steps; ++i) {
      check(cudaEventRecord(ev.a, stream), "cudaEventRecord");
      fn();
      check(cudaEventRecord(ev.b, stream), "cudaEventRecord");
      check(cudaEventSynchronize(ev.b), "cudaEventSynchronize");
      float ms = 0;
      check(cudaEventElapsedTime(&ms, ev.a, ev.b), "cudaEventElapsedTime");
      t.push_back(static_cast<double>(ms) * 1e-3);
    }
    return t;
  }
#else
  (void)cuda;
#endif
  for (int64_t i = 0; i < steps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    be.synchronize();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return t;
}

const char* impl_name(AttentionImpl i) { return i == AttentionImpl::Flash ? "flash" : "eager"; }

}  // namespace

json run_attention_bench(const BenchOptions& o) {
  if (o.steps <= 0) throw InputError("--steps must be > 0");
  if (o.warmup < 0) throw InputError("--warmup must be >= 0");
  if (o.seq_lens.empty()) throw InputError("--seq-lens: give at least one sequence length");
  constexpr int64_t kMaxDim = int64_t{1} << 20;
  for (int64_t T : o.seq_lens)
    if (T < 1 || T > kMaxDim)
      throw InputError("--seq-lens: every length must be in [1, " + std::to_string(kMaxDim) + "], got " +
                       std::to_string(T));
  if (o.attn_batch < 1 || o.attn_batch > kMaxDim) throw InputError("--attn-batch must be in [1, 2^20]");
  if (o.attn_heads < 1 || o.attn_heads > 4096) throw InputError("--attn-heads must be in [1, 4096]");
  if (o.attn_head_dim < 1 || o.attn_head_dim > 4096) throw InputError("--attn-head-dim must be in [1, 4096]");
  const bool cuda = o.device == "cuda";
  auto be = bench_backend(o);
  const int64_t B = o.attn_batch, H = o.attn_heads, d = o.attn_head_dim, C = H * d;
  std::vector<AttentionImpl> impls = {AttentionImpl::Eager};
  if (cuda) impls.push_back(AttentionImpl::Flash);

  json rows = json::array();
  Rng rng(o.seed);
  for (int64_t T : o.seq_lens) {
    // The same N(0, 1) inputs for every implementation at this T.
    Tensor hq = Tensor::host({B, T, 3 * C}, DType::F32), hd = Tensor::host({B, T, C}, DType::F32);
    for (int64_t i = 0; i < hq.numel(); ++i) hq.data<float>()[i] = static_cast<float>(rng.normal());
    for (int64_t i = 0; i < hd.numel(); ++i) hd.data<float>()[i] = static_cast<float>(rng.normal());
    const double fwd_flops = 4.0 * static_cast<double>(B * H) * static_cast<double>(T) * static_cast<double>(T) *
                             static_cast<double>(d) / 2.0;
    for (AttentionImpl impl : impls) {
      json row = {{"T", T}, {"implementation", impl_name(impl)}};
      try {
        be->set_attention_impl(impl);
        const Tensor qkv = be->empty({B, T, 3 * C}, DType::BF16), dout = be->empty({B, T, C}, DType::BF16);
        be->copy_from_host(qkv, hq);
        be->copy_from_host(dout, hd);
        const Tensor out = be->empty({B, T, C}, DType::BF16);
        const Tensor saved = be->empty(be->attention_saved_shape(B, T, H), be->attention_saved_dtype(DType::BF16));
        const Tensor dqkv = be->zeros({B, T, 3 * C}, DType::BF16);
        const auto fwd = [&] { be->attention_forward(out, saved, qkv, Tensor(), H); };
        const auto fwd_bwd = [&] {
          fwd();
          be->attention_backward(dqkv, dout, qkv, out, saved, H);
        };
        const auto tf = time_runs(*be, cuda, o.warmup, o.steps, fwd);
        const auto tfb = time_runs(*be, cuda, o.warmup, o.steps, fwd_bwd);
        const double mf = median(tf), mfb = median(tfb);
        row["forward_s"] = mf;
        row["forward_times_s"] = tf;
        row["forward_backward_s"] = mfb;
        row["forward_backward_times_s"] = tfb;
        row["backward_s"] = mfb - mf;
        row["forward_tflops"] = mf > 0 ? fwd_flops / mf / 1e12 : 0.0;
        row["forward_backward_tflops"] = mfb > 0 ? 3.5 * fwd_flops / mfb / 1e12 : 0.0;
      } catch (const InputError&) {
        throw;
      } catch (const Error& e) {  // the implementation refused the shape (or the device failed): say so, go on
        row["error"] = e.what();
      }
      rows.push_back(row);
    }
    be->set_attention_impl(AttentionImpl::Eager);
  }

  json r;
  r["schema"] = "dpo-bench-attention-1";
  r["date"] = utc_now();
  const std::string git = run_cmd("git rev-parse HEAD 2>/dev/null");
  r["git_commit"] = git.empty() ? "unknown" : git;
  r["command_line"] = o.command_line;
  r["machine"] = {{"uname", run_cmd("uname -a")}, {"nproc", online_cpus()}, {"cpu_model", cpu_model()}};
  r["device"] = o.device;
  r["backend"] = be->name();
  r["mode"] = "attention-only";
  r["causal"] = true;
  r["precision"] = "bf16";
  r["batch"] = B;
  r["heads"] = H;
  r["head_dim"] = d;
  r["seq_lens"] = o.seq_lens;
  r["warmup"] = std::max<int64_t>(o.warmup, 1);
  r["steps"] = o.steps;
  r["seed"] = o.seed;
  r["timing"] = cuda ? "CUDA events around each run on the backend's stream; median of steps runs"
                     : "steady_clock around each run; median of steps runs";
  r["flops_convention"] = "forward 4*B*H*T^2*d/2 (causal), backward 2.5x forward";
  r["results"] = rows;
  if (o.print_table) {
    std::printf("dpo bench --attention-only: %s, bf16, causal, B %lld, %lld heads of %lld, median of %lld runs\n",
                be->name().c_str(), static_cast<long long>(B), static_cast<long long>(H), static_cast<long long>(d),
                static_cast<long long>(o.steps));
    for (const auto& row : rows) {
      const auto T = row["T"].get<int64_t>();
      const auto name = row["implementation"].get<std::string>();
      if (row.contains("error")) {
        std::printf("T=%5lld %s: not run: %s\n", static_cast<long long>(T), name.c_str(),
                    row["error"].get<std::string>().c_str());
        continue;
      }
      std::printf("T=%5lld %s: forward %.3f ms (%.1f TFLOP/s), forward+backward %.3f ms (%.1f TFLOP/s)\n",
                  static_cast<long long>(T), name.c_str(), row["forward_s"].get<double>() * 1e3,
                  row["forward_tflops"].get<double>(), row["forward_backward_s"].get<double>() * 1e3,
                  row["forward_backward_tflops"].get<double>());
    }
  }
  if (!o.json_path.empty()) {
    std::ofstream f(o.json_path);
    if (!f) throw InputError("--json: cannot write " + o.json_path);
    f << r.dump(2) << "\n";
    if (!f) throw InputError("--json: write failed for " + o.json_path);
  }
  return r;
}

std::string format_bench_table(const json& r) {
  std::ostringstream s;
  char b[512];
  auto line = [&](const char* k, const std::string& v) {
    std::snprintf(b, sizeof b, "  %-24s %s\n", k, v.c_str());
    s << b;
  };
  auto f = [&](const char* fmt, double v) {
    std::snprintf(b, sizeof b, fmt, v);
    return std::string(b);
  };
  const auto& sh = r["shape"];
  const auto& w = r["workload"];
  s << "dpo bench\n";
  line("shape", sh["name"].get<std::string>() + " (L=" + std::to_string(sh["n_layer"].get<int64_t>()) +
                    " d=" + std::to_string(sh["n_embd"].get<int64_t>()) +
                    " h=" + std::to_string(sh["n_head"].get<int64_t>()) +
                    ", N=" + std::to_string(sh["parameters"].get<int64_t>()) + ")");
  line("workload", w["name"].get<std::string>() + " (prompt " + std::to_string(w["prompt_len"].get<int64_t>()) +
                       ", chosen " + std::to_string(w["chosen_len"].get<int64_t>()) + ", rejected " +
                       std::to_string(w["rejected_len"].get<int64_t>()) + "; exact lengths)");
  line("device", r["device"].get<std::string>() + " / " + r["backend"].get<std::string>() + ", threads " +
                     (r["threads"]["used"].is_null() ? std::string("n/a") : r["threads"]["used"].dump()));
  if (r.value("cuda_graphs", false)) line("cuda graphs", "on (forward, loss and backward replayed as one graph)");
  if (r.contains("head_compaction"))
    line("lm head", r["head_compaction"].get<bool>() ? "scored slots only (--head-compaction on)"
                                                     : "every slot (--head-compaction off)");
  if (r.contains("cpu_kernels") && r["cpu_kernels"].is_object()) {
    const auto& k = r["cpu_kernels"];
    line("cpu kernels", k["id"].get<std::string>() + " (" + k["core_origin"].get<std::string>() + "; core " +
                            k["core_fit"].get<std::string>() + ")");
    line("cpu", k["cpu_brand"].get<std::string>() + " (" + k["cpu_vendor"].get<std::string>() + " family " +
                    std::to_string(k["cpu_family"].get<int>()) + " model " + std::to_string(k["cpu_model"].get<int>()) +
                    "), " + k["cpu_simd_level"].get<std::string>() + ": " + k["cpu_features"].get<std::string>());
  }
  line("reference", r["reference"].get<std::string>());
  line("pairs / rows", std::to_string(r["pairs"].get<int64_t>()) + " / " + std::to_string(r["rows"].get<int64_t>()) +
                           ", row length " + std::to_string(r["padded_len"].get<int64_t>()));
  line("steps", std::to_string(r["warmup_steps"].get<int64_t>()) + " warm-up + " +
                    std::to_string(r["timed_steps"].get<int64_t>()) + " timed");
  line("step time", f("median %.4f s", r["step_seconds_median"].get<double>()) +
                        f(", min %.4f", r["step_seconds_min"].get<double>()) +
                        f(", max %.4f", r["step_seconds_max"].get<double>()));
  line("tokens / step", std::to_string(r["tokens_per_step"].get<int64_t>()) + " real (" +
                            std::to_string(r["padded_tokens_per_step"].get<int64_t>()) + " slots)");
  line("tokens/s", f("%.1f", r["tokens_per_second"].get<double>()));
  line("pairs/s", f("%.3f", r["pairs_per_second"].get<double>()));
  s << "  phases (median s, " << r["phase_timing"].get<std::string>() << ")\n";
  const double med = r["step_seconds_median"].get<double>();
  for (const char* k : kPhases) {
    const double v = r["phase_seconds_median"][k].get<double>();
    std::snprintf(b, sizeof b, "    %-22s %.4f  (%5.1f%%)\n", k, v, med > 0 ? 100 * v / med : 0.0);
    s << b;
  }
  line("FLOPs / step", f("%.4g", r["flops_per_step"].get<double>()) + "  = " + r["flops_formula"].get<std::string>());
  line("achieved", f("%.2f GFLOP/s", r["achieved_flops_per_second"].get<double>() / 1e9));
  line("MFU", r["mfu"].is_null() ? std::string("n/a (no --peak-tflops)")
                                 : f("%.2f%%", 100 * r["mfu"].get<double>()) +
                                       f(" of %.0f TFLOP/s", r["peak_tflops"].get<double>()));
  line("peak RSS", f("%.1f MiB", r["peak_rss_mib"].get<double>()));
  if (r.contains("peak_tensor_bytes"))
    line("peak tensors", r["peak_tensor_bytes"].is_null()
                             ? std::string("n/a (counted on the CPU backend only)")
                             : f("%.1f MiB (CPU backend's tensors, measured)",
                                 r["peak_tensor_bytes"].get<double>() / 1048576.0));
  if (r.contains("gradient_checkpointing"))
    line("checkpointing", r["gradient_checkpointing"].get<int64_t>() > 0
                              ? "on, " + std::to_string(r["gradient_checkpointing"].get<int64_t>()) +
                                    " block(s) per recomputed segment"
                              : std::string("off (--gradient-checkpointing N turns it on)"));
  line("device memory", r["device_memory_used_mib"].is_null() ? std::string("n/a")
                                                              : f("%.1f MiB used", r["device_memory_used_mib"].get<double>()));
  line("last loss", f("%.6g", r["last_loss"].get<double>()));
  if (r.contains("kernel_trace") && r["kernel_trace"]["status"] == "ok") {
    const auto& kt = r["kernel_trace"];
    s << format_kernel_table(kernel_table_from_json(r), 30, r["timed_steps"].get<int64_t>());
    if (!kt["gpu_busy_fraction"].is_null())
      line("GPU busy", f("%.1f%% of the timed steps' wall time", 100 * kt["gpu_busy_fraction"].get<double>()) +
                           f(" (%.3f ms GPU", kt["gpu_time_ms"].get<double>()) +
                           f(" in %.3f ms)", kt["timed_wall_ms"].get<double>()));
    s << "  (step times above include CUPTI's tracing overhead)\n";
  } else if (r.contains("kernel_trace") && r["kernel_trace"]["status"] == "unavailable") {
    line("kernels", "not available: " + r["kernel_trace"]["error"].get<std::string>() +
                        " (the bench ran without the kernel table)");
  }
  return s.str();
}

}  // namespace dpo
