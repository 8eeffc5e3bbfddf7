#include "train/sample.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace dpo {

void validate(const SampleOptions& o) {
  if (!(o.temperature >= 0) || !std::isfinite(o.temperature))
    throw InputError("temperature must be >= 0, got " + std::to_string(o.temperature));
  if (o.top_k < 0) throw InputError("top_k must be >= 0, got " + std::to_string(o.top_k));
  if (!(o.top_p > 0 && o.top_p <= 1)) throw InputError("top_p must be in (0, 1], got " + std::to_string(o.top_p));
  if (o.max_new_tokens <= 0) throw InputError("max_new_tokens must be > 0, got " + std::to_string(o.max_new_tokens));
}

int32_t sample_token(const float* logits, int64_t V, const SampleOptions& o, Rng& rng) {
  if (o.temperature == 0) {
    return static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
  }
  // Candidates sorted by logit (descending); ties broken by id so the order is deterministic.
  std::vector<int32_t> idx(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t keep = V;
  if (o.top_k > 0) keep = std::min(keep, o.top_k);
  const double mx = logits[idx[0]];
  std::vector<double> p(static_cast<size_t>(keep));
  double z = 0;
  for (int64_t i = 0; i < keep; ++i) {
    p[static_cast<size_t>(i)] = std::exp((logits[idx[static_cast<size_t>(i)]] - mx) / o.temperature);
    z += p[static_cast<size_t>(i)];
  }
  if (o.top_p < 1) {
    // Smallest prefix whose probability reaches top_p (the token that crosses the threshold is kept).
    double acc = 0;
    int64_t n = 0;
    while (n < keep) {
      acc += p[static_cast<size_t>(n)] / z;
      ++n;
      if (acc >= o.top_p) break;
    }
    keep = n;
    z = 0;
    for (int64_t i = 0; i < keep; ++i) z += p[static_cast<size_t>(i)];
  }
  double u = rng.uniform() * z;
  for (int64_t i = 0; i < keep; ++i) {
    u -= p[static_cast<size_t>(i)];
    if (u < 0) return idx[static_cast<size_t>(i)];
  }
  return idx[static_cast<size_t>(keep - 1)];  // rounding left u marginally >= 0
}

std::vector<std::vector<int32_t>> generate(GPT2& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const SampleOptions& opt, Rng& rng) {
  validate(opt);
  const int64_t B = static_cast<int64_t>(prompts.size());
  std::vector<std::vector<int32_t>> out(prompts.size());
  if (B == 0) return out;
  const int64_t maxT = model.config().max_seq_len, V = model.config().vocab_size;
  std::vector<std::vector<int32_t>> seq = prompts;
  int64_t longest = 0;
  for (const auto& p : prompts) {
    if (p.empty()) throw InputError("generate: empty prompt");
    if (static_cast<int64_t>(p.size()) >= maxT)
      throw InputError("generate: a prompt of " + std::to_string(p.size()) + " tokens leaves no room in the " +
                       std::to_string(maxT) + "-token context");
    longest = std::max<int64_t>(longest, static_cast<int64_t>(p.size()));
  }
  std::vector<char> done(prompts.size(), 0);
  Backend& be = model.backend();
  Tensor host_logits;
  for (int64_t step = 0; step < opt.max_new_tokens; ++step) {
    int64_t T = 0;
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      if (!done[b] && static_cast<int64_t>(seq[b].size()) >= maxT) done[b] = 1;  // context full
      if (!done[b]) any = true;
      T = std::max<int64_t>(T, static_cast<int64_t>(seq[b].size()));
    }
    if (!any) break;
    Tensor tokens = Tensor::host({B, T}, DType::I32);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < static_cast<int64_t>(seq[b].size()); ++t) tokens.data<int32_t>()[b * T + t] = seq[b][t];
    Tensor dev_tokens = tokens;
    if (be.device().kind != DeviceKind::CPU) {
      dev_tokens = be.empty({B, T}, DType::I32);
      be.copy_from_host(dev_tokens, tokens);
    }
    const Tensor& logits = model.forward(dev_tokens, Tensor());
    if (!host_logits.defined() || host_logits.numel() != logits.numel())
      host_logits = Tensor::host(logits.shape(), DType::F32);
    be.copy_to_host(host_logits, logits);
    for (int64_t b = 0; b < B; ++b) {
      if (done[b]) continue;
      const int64_t last = static_cast<int64_t>(seq[b].size()) - 1;
      // Rows of ldv = logits.size(-1) >= V elements (the padded LM-head layout, model/gpt2.h); the first V count.
      int32_t tok = sample_token(host_logits.data<float>() + (b * T + last) * logits.size(-1), V, opt, rng);
      seq[b].push_back(tok);
      out[b].push_back(tok);
      if (tok == opt.eos_id) done[b] = 1;
    }
  }
  return out;
}

}  // namespace dpo
