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

namespace {

// One full forward of the right-padded batch per new token.
std::vector<std::vector<int32_t>> generate_full(GPT2& model, const std::vector<std::vector<int32_t>>& prompts,
                                                const SampleOptions& opt, Rng& rng, const LogitsObserver& observe) {
  const int64_t B = static_cast<int64_t>(prompts.size());
  const int64_t maxT = model.config().max_seq_len, V = model.config().vocab_size;
  std::vector<std::vector<int32_t>> out(prompts.size());
  std::vector<std::vector<int32_t>> seq = prompts;
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
    const Tensor& logits = model.forward(to_backend(be, tokens), Tensor());
    if (!host_logits.defined() || host_logits.numel() != logits.numel())
      host_logits = Tensor::host(logits.shape(), DType::F32);
    be.copy_to_host(host_logits, logits);
    for (int64_t b = 0; b < B; ++b) {
      if (done[b]) continue;
      const int64_t last = static_cast<int64_t>(seq[b].size()) - 1;
      // Rows of ldv = logits.size(-1) >= V elements (the padded LM-head layout, model/gpt2.h); the first V count.
      const float* row = host_logits.data<float>() + (b * T + last) * logits.size(-1);
      if (observe) observe(step, b, row, V);
      int32_t tok = sample_token(row, V, opt, rng);
      seq[b].push_back(tok);
      out[b].push_back(tok);
      if (tok == opt.eos_id) done[b] = 1;
    }
  }
  return out;
}

// Prefill, then one token per sequence per step against the key/value cache. Row i of the cache's batch is prompt
// prompt_of[i]; finished sequences leave the batch, and the draws still go in prompt order.
std::vector<std::vector<int32_t>> generate_cached(GPT2& model, const std::vector<std::vector<int32_t>>& prompts,
                                                  const SampleOptions& opt, Rng& rng, const LogitsObserver& observe,
                                                  int64_t longest) {
  const int64_t B = static_cast<int64_t>(prompts.size());
  const int64_t maxT = model.config().max_seq_len, V = model.config().vocab_size;
  std::vector<std::vector<int32_t>> out(prompts.size());
  Backend& be = model.backend();
  Tensor tokens = Tensor::host({B, longest}, DType::I32);  // zero-filled: the right padding
  std::vector<int64_t> len(prompts.size());  // each prompt's sequence length so far
  for (int64_t b = 0; b < B; ++b) {
    len[b] = static_cast<int64_t>(prompts[b].size());
    std::copy(prompts[b].begin(), prompts[b].end(), tokens.data<int32_t>() + b * longest);
  }
  // Positions fed: at most longest + max_new_tokens - 2 (the last token drawn is never fed) and at most maxT - 2
  // (a sequence that reaches maxT stops), so this capacity always suffices.
  const int64_t capacity = std::min(maxT, longest + opt.max_new_tokens);
  struct EndDecode {
    GPT2& m;
    ~EndDecode() { m.decode_end(); }
  } end_decode{model};
  const Tensor* logits = &model.decode_prefill(to_backend(be, tokens), len, capacity);
  const int64_t ldv = logits->size(-1);
  const Tensor host_all = Tensor::host({B, ldv}, DType::F32);
  std::vector<int64_t> prompt_of(prompts.size());
  std::iota(prompt_of.begin(), prompt_of.end(), int64_t{0});
  std::vector<int32_t> last(prompts.size());
  for (int64_t step = 0;; ++step) {
    const int64_t n = model.decode_batch();
    const Tensor host = host_all.view(0, {n, ldv});
    be.copy_to_host(host, *logits);
    std::vector<int64_t> order(static_cast<size_t>(n));  // cache rows in prompt order
    std::iota(order.begin(), order.end(), int64_t{0});
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return prompt_of[a] < prompt_of[b]; });
    std::vector<char> done(static_cast<size_t>(n), 0);
    for (int64_t i : order) {
      const int64_t b = prompt_of[i];
      const float* row = host.data<float>() + i * ldv;
      if (observe) observe(step, b, row, V);
      const int32_t tok = sample_token(row, V, opt, rng);
      out[b].push_back(tok);
      last[i] = tok;
      ++len[b];
      done[i] = tok == opt.eos_id || len[b] >= maxT;  // EOS, or the context is full
    }
    if (step + 1 >= opt.max_new_tokens) break;
    std::vector<int64_t> keep;
    for (int64_t i = 0; i < n; ++i)
      if (!done[i]) keep.push_back(i);
    if (keep.empty()) break;
    const auto m = static_cast<int64_t>(keep.size());
    if (m < n) {
      // Sequences at rows >= m that go on fill the rows < m that finished (decode_select's rule).
      std::vector<int64_t> rows(static_cast<size_t>(m));
      std::vector<int64_t> movers;
      for (int64_t i : keep)
        if (i >= m) movers.push_back(i);
      size_t next = 0;
      for (int64_t i = 0; i < m; ++i) rows[i] = done[i] ? movers[next++] : i;
      model.decode_select(rows);
      std::vector<int64_t> p2(static_cast<size_t>(m));
      std::vector<int32_t> l2(static_cast<size_t>(m));
      for (int64_t i = 0; i < m; ++i) {
        p2[i] = prompt_of[rows[i]];
        l2[i] = last[rows[i]];
      }
      prompt_of = std::move(p2);
      last = std::move(l2);
    }
    std::vector<int32_t> feed(static_cast<size_t>(m));
    std::vector<int64_t> pos(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) {
      feed[i] = last[i];
      pos[i] = len[prompt_of[i]] - 1;  // the position of the token just drawn
    }
    logits = &model.decode_step(feed, pos);
  }
  return out;
}

}  // namespace

std::vector<std::vector<int32_t>> generate(GPT2& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const SampleOptions& opt, Rng& rng, const LogitsObserver& observe) {
  validate(opt);
  std::vector<std::vector<int32_t>> out(prompts.size());
  if (prompts.empty()) return out;
  const int64_t maxT = model.config().max_seq_len;
  int64_t longest = 0;
  for (const auto& p : prompts) {
    if (p.empty()) throw InputError("generate: empty prompt");
    if (static_cast<int64_t>(p.size()) >= maxT)
      throw InputError("generate: a prompt of " + std::to_string(p.size()) + " tokens leaves no room in the " +
                       std::to_string(maxT) + "-token context");
    longest = std::max<int64_t>(longest, static_cast<int64_t>(p.size()));
  }
  if (opt.decoding == Decoding::FullRecompute) return generate_full(model, prompts, opt, rng, observe);
  return generate_cached(model, prompts, opt, rng, observe, longest);
}

}  // namespace dpo
