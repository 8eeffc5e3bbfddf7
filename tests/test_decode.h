// Checks of the key/value-cache decoding against the full recompute, shared by tests/test_sample.cpp (CPU) and
// tests/test_cuda_sample.cpp (CUDA): generation with both Decoding modes compared token for token and logit for
// logit, and a teacher-forced run of GPT2's decoding API compared with forward() on the whole sequences.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "model/gpt2.h"
#include "train/sample.h"

namespace dpo::test {

inline std::string sci(double x) {
  std::ostringstream s;
  s << std::scientific << std::setprecision(3) << x;
  return s.str();
}

// Tolerance of the fp32 logits (kLogitTol, relative to max(1, max |logit|) of the row). Both paths evaluate the same
// per-row expressions: the encoder, LayerNorm and GELU are the same kernels on the same rows, and the cached
// attention step does the full attention's arithmetic in the same order (bitwise equal on equal inputs,
// tests/test_kernels_cpu.cpp). What may differ is the fp32 summation order inside the BLAS GEMMs, whose blocking
// can depend on the row count (B rows per step against B*T rows). A length-K fp32 dot product is within K u of the
// exact value relative to the sum of its terms' magnitudes (Higham 3.1; u = 2^-24), K <= 4C = 512 here: 3e-5 per
// GEMM in the worst case, and a layer chains two GEMMs on each branch; 2e-4 covers a few such differences (measured
// on the CPU: 5e-7). A wrong position, a stale or missing key, or a row mixed with another changes the logits by
// O(0.1) (their spread).
constexpr double kLogitTol = 2e-4;

using StepLogits = std::map<std::pair<int64_t, int64_t>, std::vector<float>>;  // (step, prompt) -> logits

inline std::vector<std::vector<int32_t>> run(GPT2& m, const std::vector<std::vector<int32_t>>& prompts,
                                             SampleOptions o, Decoding d, uint64_t seed, StepLogits* logits) {
  o.decoding = d;
  Rng rng(seed);
  return generate(m, prompts, o, rng, [&](int64_t step, int64_t prompt, const float* l, int64_t V) {
    (*logits)[{step, prompt}] = std::vector<float>(l, l + V);
  });
}

// Same tokens, the same (step, prompt) pairs observed, and logits within kLogitTol.
inline void expect_cache_matches_recompute(GPT2& m, const std::vector<std::vector<int32_t>>& prompts,
                                           const SampleOptions& o, uint64_t seed, double tol = kLogitTol) {
  StepLogits full, cached;
  const auto want = run(m, prompts, o, Decoding::FullRecompute, seed, &full);
  const auto got = run(m, prompts, o, Decoding::KvCache, seed, &cached);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i], want[i]) << "prompt " << i;
  ASSERT_EQ(cached.size(), full.size());
  double worst = 0;
  for (const auto& [key, ref] : full) {
    const auto it = cached.find(key);
    ASSERT_NE(it, cached.end()) << "step " << key.first << " prompt " << key.second;
    double scale = 1.0;
    for (float x : ref) scale = std::max(scale, std::fabs(static_cast<double>(x)));
    for (size_t v = 0; v < ref.size(); ++v) {
      const double e = std::fabs(static_cast<double>(it->second[v]) - ref[v]) / scale;
      if (!(e <= worst)) worst = e;  // NaN propagates
    }
  }
  EXPECT_LE(worst, tol) << "largest logit difference, relative to the row's scale";
  ::testing::Test::RecordProperty("max_rel_logit_diff", sci(worst));
}

// Prompts of several lengths; with n_positions 24 and 20 new tokens the longer ones reach the context limit at
// different steps, so sequences leave the batch one by one (decode_select) while the others go on.
inline std::vector<std::vector<int32_t>> mixed_prompts(std::mt19937_64& g, int32_t vocab, std::vector<size_t> lengths) {
  std::uniform_int_distribution<int32_t> d(0, vocab - 1);
  std::vector<std::vector<int32_t>> p;
  for (size_t n : lengths) {
    std::vector<int32_t> t(n);
    for (auto& x : t) x = d(g);
    p.push_back(t);
  }
  return p;
}

// GPT-2 of real head size (hs = 64) at random init, sampled logits near GPT-2's own scale.
inline GPT2Config head64_config() {
  GPT2Config c;
  c.vocab_size = 300;
  c.max_seq_len = 40;
  c.n_embd = 128;
  c.n_head = 2;
  c.n_layer = 3;
  return c;
}

inline std::vector<SampleOptions> option_sets(int64_t max_new, int32_t eos) {
  SampleOptions greedy;
  greedy.temperature = 0;
  SampleOptions plain;  // temperature 1
  SampleOptions filtered;
  filtered.temperature = 0.7;
  filtered.top_k = 20;
  filtered.top_p = 0.9;
  std::vector<SampleOptions> v = {greedy, plain, filtered};
  for (auto& o : v) {
    o.max_new_tokens = max_new;
    o.eos_id = eos;
  }
  return v;
}

// The model's decoding API, teacher-forced: prefill, then the given tokens one by one (sequences leaving the batch
// half-way), against forward() on the whole sequences.
struct ForcedRun {
  std::vector<std::vector<double>> logits;  // [sequence][position * V + v], positions >= its prompt length - 1
};

inline ForcedRun forced_decode(GPT2& m, const std::vector<std::vector<int32_t>>& seqs,
                               const std::vector<int64_t>& prompt_len, int64_t leave_at) {
  Backend& be = m.backend();
  const int64_t B = static_cast<int64_t>(seqs.size()), V = m.config().vocab_size, ldv = m.logits_stride();
  int64_t P = 0, Tmax = 0;
  for (int64_t b = 0; b < B; ++b) {
    P = std::max(P, prompt_len[b]);
    Tmax = std::max<int64_t>(Tmax, static_cast<int64_t>(seqs[b].size()));
  }
  Tensor tok = Tensor::host({B, P}, DType::I32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < prompt_len[b]; ++t) tok.data<int32_t>()[b * P + t] = seqs[b][t];
  ForcedRun r;
  r.logits.assign(static_cast<size_t>(B), std::vector<double>(static_cast<size_t>(Tmax * V), std::nan("")));
  std::vector<int64_t> seq_of(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) seq_of[b] = b;
  auto take = [&](const Tensor& logits, const std::vector<int64_t>& at) {
    const auto h = to_host_f64(be, logits);
    for (size_t i = 0; i < seq_of.size(); ++i)
      for (int64_t v = 0; v < V; ++v) r.logits[seq_of[i]][at[i] * V + v] = h[i * ldv + v];
  };
  std::vector<int64_t> at(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) at[b] = prompt_len[b] - 1;
  take(m.decode_prefill(to_backend(be, tok), prompt_len, Tmax), at);
  for (int64_t step = 0;; ++step) {
    if (step == leave_at && seq_of.size() > 1) {  // sequence 0 leaves: the last one takes its place
      std::vector<int64_t> rows;
      rows.push_back(static_cast<int64_t>(seq_of.size()) - 1);
      for (size_t i = 1; i + 1 < seq_of.size(); ++i) rows.push_back(static_cast<int64_t>(i));
      m.decode_select(rows);
      std::vector<int64_t> s2;
      for (int64_t i : rows) s2.push_back(seq_of[i]);
      seq_of = s2;
    }
    std::vector<int32_t> feed;
    std::vector<int64_t> pos;
    bool any = false;
    for (int64_t b : seq_of) {
      const int64_t p = prompt_len[b] + step;  // the token at position p goes in
      any |= p < static_cast<int64_t>(seqs[b].size());
      const int64_t pc = std::min<int64_t>(p, static_cast<int64_t>(seqs[b].size()) - 1);
      feed.push_back(seqs[b][pc]);
      pos.push_back(pc);  // a finished sequence rewrites its last position (allowed: no gap)
    }
    if (!any) break;
    take(m.decode_step(feed, pos), pos);
  }
  m.decode_end();
  return r;
}

// forward() of each sequence alone, every position.
inline std::vector<std::vector<double>> full_logits(GPT2& m, const std::vector<std::vector<int32_t>>& seqs) {
  Backend& be = m.backend();
  const int64_t V = m.config().vocab_size, ldv = m.logits_stride();
  std::vector<std::vector<double>> out;
  for (const auto& s : seqs) {
    const int64_t T = static_cast<int64_t>(s.size());
    Tensor tok = Tensor::host({1, T}, DType::I32);
    std::copy(s.begin(), s.end(), tok.data<int32_t>());
    const auto h = to_host_f64(be, m.forward(to_backend(be, tok), Tensor()));
    std::vector<double> l(static_cast<size_t>(T * V));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t v = 0; v < V; ++v) l[t * V + v] = h[t * ldv + v];
    out.push_back(l);
  }
  return out;
}

// max |a - b| / max(1, max |b|) over the positions a holds (from prompt_len - 1 on).
inline double forced_err(const ForcedRun& r, const std::vector<std::vector<double>>& ref,
                         const std::vector<int64_t>& prompt_len, int64_t V) {
  double err = 0, scale = 1;
  for (size_t b = 0; b < ref.size(); ++b)
    for (size_t i = static_cast<size_t>((prompt_len[b] - 1) * V); i < ref[b].size(); ++i) {
      scale = std::max(scale, std::fabs(ref[b][i]));
      const double e = std::fabs(r.logits[b][i] - ref[b][i]);
      if (!(e <= err)) err = e;
    }
  return err / scale;
}

// Teacher-forced decoding of four sequences (one leaves the batch at step 3, one is all prompt) on `be`, in F32 and
// BF16, against forward() on the whole sequences.
// F32: within kLogitTol. BF16: the cache holds BF16 keys and values and each op rounds its output once, so the two
// BF16 paths differ wherever an fp32 difference in summation order moves a value across a BF16 rounding boundary.
// Measured against the F32 oracle, the cached BF16 run must be no further off than the recomputed BF16 run, within
// `bf16_factor` (the two are the same computation up to those flips: on the CPU the ratio is 1.3, 5.5e-3 against
// 4.3e-3; a wrong position or key puts the cached run O(1) off, a hundred times the BF16 error).
inline void expect_forced_decode_matches(Backend& be, std::mt19937_64& g, double bf16_factor) {
  const auto cfg = head64_config();
  // Sequence 0 is complete after two steps and leaves at step 3; sequence 3 is all prompt (it only rewrites its
  // last position).
  const auto seqs = mixed_prompts(g, static_cast<int32_t>(cfg.vocab_size), {8, 19, 33, 14});
  const std::vector<int64_t> prompt_len = {6, 1, 11, 14};
  GPT2 m32(be, cfg, DType::F32), m16(be, cfg, DType::BF16);
  Rng i1(5), i2(5);
  m32.init_random(i1);
  m16.init_random(i2);  // the same master weights, rounded to BF16 for compute
  const auto ref32 = full_logits(m32, seqs);
  const double err32 = forced_err(forced_decode(m32, seqs, prompt_len, 3), ref32, prompt_len, cfg.vocab_size);
  EXPECT_LE(err32, kLogitTol);
  const ForcedRun full16{full_logits(m16, seqs)};
  const double err_full16 = forced_err(full16, ref32, prompt_len, cfg.vocab_size);
  const double err_cached16 =
      forced_err(forced_decode(m16, seqs, prompt_len, 3), ref32, prompt_len, cfg.vocab_size);
  EXPECT_GT(err_full16, 0.0);
  EXPECT_LE(err_cached16, bf16_factor * err_full16) << "bf16 recompute error " << err_full16;
  ::testing::Test::RecordProperty("f32_err", sci(err32));
  ::testing::Test::RecordProperty("bf16_full_err", sci(err_full16));
  ::testing::Test::RecordProperty("bf16_cached_err", sci(err_cached16));
}

}  // namespace dpo::test
