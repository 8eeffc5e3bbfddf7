#include "train/demo.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "model/checkpoint.h"
#include "runtime/safetensors.h"
#include "train/data.h"
#include "train/hash.h"
#include "train/plot.h"
#include "train/sample.h"
#include "train/sentiment_task.h"
#include "train/tokenizer.h"
#include "train/trainer.h"

namespace dpo {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string fmt(double v, int prec = 3) {
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(prec);
  s << v;
  return s.str();
}

}  // namespace

namespace demo {

std::vector<double> completion_logps(GPT2& m, const std::vector<SftExample>& ex, int64_t batch) {
  std::vector<double> out(ex.size());
  const int64_t n = static_cast<int64_t>(ex.size());
  for (int64_t s = 0; s < n; s += batch) {
    std::vector<int64_t> idx;
    for (int64_t i = s; i < std::min(n, s + batch); ++i) idx.push_back(i);
    Batch b = make_sft_batch(ex, idx, m.dtype(), 0);
    Tensor seq = Tensor::host({b.tokens.size(0)}, m.dtype());
    m.score(b.tokens, b.keymask, b.targets, b.weights, seq);
    for (size_t r = 0; r < idx.size(); ++r) out[static_cast<size_t>(idx[r])] = seq.data<float>()[r];
  }
  return out;
}

Samples sample_from(GPT2& m, const Tokenizer& tok, const std::vector<std::string>& prompts, uint64_t seed,
                    int64_t batch) {
  Samples s;
  SampleOptions so;
  so.temperature = 1.0;  // exact samples of the policy: the KL estimate needs them
  so.max_new_tokens = kMaxCompletionBytes + 1;
  so.eos_id = tok.eos_id();
  Rng rng(seed);
  for (size_t start = 0; start < prompts.size(); start += static_cast<size_t>(batch)) {
    std::vector<std::vector<int32_t>> ids;
    const size_t end = std::min(prompts.size(), start + static_cast<size_t>(batch));
    for (size_t i = start; i < end; ++i) ids.push_back(tok.encode(prompts[i]));
    auto outs = generate(m, ids, so, rng);
    for (size_t i = 0; i < outs.size(); ++i) {
      std::vector<int32_t> text;
      for (int32_t t : outs[i])
        if (t != tok.eos_id()) text.push_back(t);
      s.prompts.push_back(prompts[start + i]);
      s.completions.push_back(tok.decode(text));
      SftExample e;
      e.prompt = ids[i];
      e.completion = outs[i];
      if (e.completion.empty()) e.completion.push_back(tok.eos_id());
      s.examples.push_back(std::move(e));
    }
  }
  return s;
}

PolicyEval evaluate_policy(GPT2& policy, GPT2& sft, const Tokenizer& tok, const std::vector<std::string>& prompts,
                           uint64_t seed) {
  Samples s = sample_from(policy, tok, prompts, seed, 64);
  std::vector<double> lp = completion_logps(policy, s.examples, 64), lq = completion_logps(sft, s.examples, 64);
  PolicyEval e;
  const double n = static_cast<double>(s.completions.size());
  double r2 = 0, k2 = 0;
  for (size_t i = 0; i < s.completions.size(); ++i) {
    const double r = sentiment_reward(s.completions[i]);
    const double k = lp[i] - lq[i];
    e.reward_mean += r / n;
    r2 += r * r / n;
    e.kl += k / n;
    k2 += k * k / n;
    e.grammatical += is_grammatical_completion(s.completions[i]) ? 1.0 / n : 0.0;
    if (i < 8) e.examples.push_back(s.prompts[i] + s.completions[i]);
  }
  e.reward_sem = std::sqrt(std::max(0.0, r2 - e.reward_mean * e.reward_mean) / n);
  e.kl_sem = std::sqrt(std::max(0.0, k2 - e.kl * e.kl) / n);
  e.grammatical_sem = std::sqrt(std::max(0.0, e.grammatical * (1 - e.grammatical)) / n);
  return e;
}

std::vector<TokenPair> label_pairs(const Samples& s, int64_t* ties) {
  std::vector<TokenPair> out;
  for (size_t i = 0; i + 1 < s.completions.size(); i += 2) {
    const double ra = sentiment_reward(s.completions[i]), rb = sentiment_reward(s.completions[i + 1]);
    if (ra == rb) {
      ++*ties;
      continue;
    }
    const size_t w = ra > rb ? i : i + 1, l = ra > rb ? i + 1 : i;
    TokenPair p;
    p.prompt = s.examples[i].prompt;
    p.chosen = s.examples[w].completion;
    p.rejected = s.examples[l].completion;
    p.score_chosen = std::max(ra, rb);
    p.score_rejected = std::min(ra, rb);
    out.push_back(std::move(p));
  }
  return out;
}

void write_token_pairs(const std::string& path, const std::vector<TokenPair>& pairs) {
  std::string text;
  for (const auto& p : pairs) {
    json j = {{"prompt_ids", p.prompt},         {"chosen_ids", p.chosen},          {"rejected_ids", p.rejected},
              {"score_chosen", p.score_chosen}, {"score_rejected", p.score_rejected}};
    text += j.dump() + "\n";
  }
  write_file_atomic(path, text);
}

std::vector<std::map<std::string, double>> read_metrics(const std::string& path) {
  std::vector<std::map<std::string, double>> out;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    json j = json::parse(line);
    std::map<std::string, double> m;
    for (auto it = j.begin(); it != j.end(); ++it)
      if (it.value().is_number()) m[it.key()] = it.value().get<double>();
    out.push_back(m);
  }
  return out;
}

Series metric_curve(const std::vector<std::map<std::string, double>>& rows, const std::string& key,
                    const std::string& label) {
  Series s;
  s.label = label;
  for (const auto& r : rows) {
    auto it = r.find(key);
    if (it == r.end()) continue;
    s.x.push_back(r.at("step"));
    s.y.push_back(it->second);
  }
  return s;
}

Prepared prepare(const std::string& out_dir, const Sizes& z, uint64_t seed, int64_t num_threads,
                 bool plain_progress, const std::function<void(const std::string&)>& say) {
  const fs::path out = out_dir;
  std::error_code ec;
  fs::create_directories(out / "data", ec);
  if (ec) throw InputError("--out: cannot create " + out.string() + ": " + ec.message());
  auto tok = make_tokenizer("byte");
  Prepared p;

  // (a) corpus
  SentimentCorpusOptions co;
  co.n_train = z.sft_examples;
  co.n_eval = 0;
  co.seed = seed;
  write_sft_jsonl((out / "data/sft.jsonl").string(), make_sft_corpus(co));
  say("(a) corpus: " + std::to_string(z.sft_examples) + " SFT examples -> " + (out / "data/sft.jsonl").string());

  // (b) SFT from a random init
  {
    auto be = make_cpu_backend(static_cast<int>(num_threads));
    GPT2Config c;
    c.vocab_size = tok->vocab_size();
    c.max_seq_len = 80;  // prompts <= 24 bytes + completions <= 48 bytes + EOS
    c.n_layer = z.n_layer;
    c.n_embd = z.n_embd;
    c.n_head = z.n_head;
    GPT2 m(*be, c, DType::F32);
    Rng rng(seed);
    m.init_random(rng);
    save_gpt2_checkpoint(m, (out / "init").string());
  }
  TrainConfig& base = p.base;
  base.max_length = 80;
  base.max_prompt_length = kMaxPromptBytes + 1;
  base.seed = static_cast<int64_t>(seed);
  base.num_threads = num_threads;
  base.ref_cache_dir = (out / "ref_cache").string();
  base.logging_steps = 10;
  RunOptions ro;
  ro.plain_progress = plain_progress;

  TrainConfig sft = base;
  sft.model = (out / "init").string();
  sft.train_file = (out / "data/sft.jsonl").string();
  sft.out_dir = (out / "sft").string();
  sft.learning_rate = 3e-3;
  sft.lr_scheduler_type = "cosine";
  sft.warmup_steps = 50;
  sft.weight_decay = 0.01;
  sft.per_device_train_batch_size = 32;
  sft.num_train_epochs = z.sft_epochs;
  say("(b) SFT of a GPT-2 (" + std::to_string(z.n_layer) + " layers, width " + std::to_string(z.n_embd) + ")");
  RunSummary sft_run = run_training(sft, RunKind::Sft, ro);
  p.sft_checkpoint = sft_run.final_checkpoint;
  p.sft_out_dir = sft.out_dir;

  // (c) pairs from SFT samples, labelled by the ground-truth reward
  auto be = make_cpu_backend(static_cast<int>(num_threads));
  verify_checkpoint(p.sft_checkpoint, CheckpointUse::Model);  // read back what the run wrote: its checksums first
  auto sft_model = load_gpt2_checkpoint(*be, p.sft_checkpoint, DType::F32);
  std::vector<std::string> pair_prompts;
  SentimentCorpusOptions po = co;
  po.n_train = z.pair_prompts;
  po.n_eval = z.eval_pairs_prompts;
  for (const auto& q : train_prompts(po)) {
    pair_prompts.push_back(q);
    pair_prompts.push_back(q);  // two samples per prompt make one candidate pair
  }
  int64_t ties = 0;
  Samples s = sample_from(*sft_model, *tok, pair_prompts, seed + 1, 64);
  auto pairs = label_pairs(s, &ties);
  p.pairs_train = (out / "data/pairs_train.jsonl").string();
  write_token_pairs(p.pairs_train, pairs);
  std::vector<std::string> eval_pp;
  for (const auto& q : eval_prompts(po)) {
    eval_pp.push_back(q);
    eval_pp.push_back(q);
  }
  int64_t eval_ties = 0;
  auto eval_pairs = label_pairs(sample_from(*sft_model, *tok, eval_pp, seed + 2, 64), &eval_ties);
  p.pairs_eval = (out / "data/pairs_eval.jsonl").string();
  write_token_pairs(p.pairs_eval, eval_pairs);
  p.n_train_pairs = static_cast<int64_t>(pairs.size());
  p.n_eval_pairs = static_cast<int64_t>(eval_pairs.size());
  p.ties = ties + eval_ties;
  say("(c) pairs: " + std::to_string(pairs.size()) + " train, " + std::to_string(eval_pairs.size()) +
      " held-out (ties dropped: " + std::to_string(ties + eval_ties) + ")");
  return p;
}

TrainConfig dpo_config(const Prepared& p, const std::string& out_dir, double beta, int64_t epochs) {
  TrainConfig d = p.base;
  d.model = p.sft_checkpoint;
  d.train_file = p.pairs_train;
  d.eval_file = p.pairs_eval;
  d.out_dir = out_dir;
  d.beta = beta;
  d.learning_rate = 2e-4;
  d.lr_scheduler_type = "constant_with_warmup";
  d.warmup_steps = 10;
  d.per_device_train_batch_size = 16;
  d.gradient_accumulation_steps = 2;
  d.num_train_epochs = epochs;
  d.eval_steps = 20;
  return d;
}

std::vector<std::string> repeated_eval_prompts(int64_t per_prompt) {
  std::vector<std::string> out;
  for (const auto& p : eval_prompt_set())
    for (int64_t k = 0; k < per_prompt; ++k) out.push_back(p);
  return out;
}

}  // namespace demo

std::string run_demo(const DemoOptions& opt) {
  using namespace demo;
  const auto t0 = std::chrono::steady_clock::now();
  if (opt.out_dir.empty()) throw InputError("--out is required");
  if (fs::exists(fs::path(opt.out_dir) / "report.json"))
    throw InputError("--out: " + opt.out_dir + " already holds a demo report; choose a new directory");
  if (opt.betas.empty()) throw InputError("--betas needs at least one value");
  for (double b : opt.betas)
    if (!(b > 0) || !std::isfinite(b)) throw InputError("--betas: every beta must be > 0, got " + std::to_string(b));
  const Sizes& z = kDemoSizes;
  const fs::path out = opt.out_dir;
  auto say = [&](const std::string& s) { std::fprintf(stderr, "[demo] %s\n", s.c_str()); };
  auto elapsed = [&]() { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  auto tok = make_tokenizer("byte");
  RunOptions ro;
  ro.plain_progress = opt.plain_progress;

  // (a)-(c)
  const Prepared prep = prepare(opt.out_dir, z, opt.seed, opt.num_threads, opt.plain_progress, say);
  const std::string& sft_ckpt = prep.sft_checkpoint;
  auto be = make_cpu_backend(static_cast<int>(opt.num_threads));
  auto sft_model = load_gpt2_checkpoint(*be, sft_ckpt, DType::F32);

  // Held-out prompts for (e): the eval prompt set, each repeated.
  const std::vector<std::string> eval_prompts_rep = repeated_eval_prompts(z.eval_samples_per_prompt);
  PolicyEval sft_eval = evaluate_policy(*sft_model, *sft_model, *tok, eval_prompts_rep, opt.seed + 3);
  say("(e) SFT policy: reward " + fmt(sft_eval.reward_mean) + " +- " + fmt(sft_eval.reward_sem));

  // (d) DPO per beta, (e) evaluation
  json runs = json::array();
  std::vector<Chart> curves;
  Series frontier;
  frontier.label = "DPO (beta)";
  frontier.style = Series::Style::LinePoints;
  json best;
  for (double beta : opt.betas) {
    std::ostringstream name;
    name << "dpo_beta_" << beta;
    TrainConfig d = dpo_config(prep, (out / name.str()).string(), beta, z.dpo_epochs);
    say("(d) DPO with beta " + fmt(beta, 3));
    RunSummary r = run_training(d, RunKind::Dpo, ro);
    verify_checkpoint(r.final_checkpoint, CheckpointUse::Model);
    auto pol = load_gpt2_checkpoint(*be, r.final_checkpoint, DType::F32);
    PolicyEval e = evaluate_policy(*pol, *sft_model, *tok, eval_prompts_rep, opt.seed + 3);
    say("(e) DPO beta " + fmt(beta, 3) + ": reward " + fmt(e.reward_mean) + " +- " + fmt(e.reward_sem) + ", KL " +
        fmt(e.kl) + " +- " + fmt(e.kl_sem) + ", held-out implicit accuracy " +
        fmt(r.eval.count("eval_rewards/accuracies") ? r.eval.at("eval_rewards/accuracies") : NAN));
    json j = {{"beta", beta},
              {"reward_mean", e.reward_mean},
              {"reward_sem", e.reward_sem},
              {"kl", e.kl},
              {"kl_sem", e.kl_sem},
              {"grammatical_fraction", e.grammatical},
              {"implicit_reward_accuracy", r.eval.count("eval_rewards/accuracies") ? r.eval.at("eval_rewards/accuracies") : NAN},
              {"eval_loss", r.eval.count("eval_loss") ? r.eval.at("eval_loss") : NAN},
              {"checkpoint", r.final_checkpoint},
              {"samples", e.examples}};
    runs.push_back(j);
    frontier.x.push_back(e.kl);
    frontier.y.push_back(e.reward_mean);
    if (best.is_null() || std::fabs(beta - 0.1) < std::fabs(best["beta"].get<double>() - 0.1)) best = j;
    auto rows = read_metrics(d.out_dir + "/metrics.jsonl");
    Chart c1{"DPO beta " + fmt(beta, 2) + ": loss", "step", "loss", {metric_curve(rows, "loss", "train"), metric_curve(rows, "eval_loss", "held-out")}};
    Chart c2{"DPO beta " + fmt(beta, 2) + ": implicit reward", "step", "reward", {metric_curve(rows, "rewards/chosen", "chosen"), metric_curve(rows, "rewards/rejected", "rejected"), metric_curve(rows, "rewards/margins", "margin")}};
    Chart c3{"DPO beta " + fmt(beta, 2) + ": preference accuracy", "step", "accuracy", {metric_curve(rows, "rewards/accuracies", "train"), metric_curve(rows, "eval_rewards/accuracies", "held-out")}};
    curves.push_back(c1);
    curves.push_back(c2);
    curves.push_back(c3);
  }
  auto sft_rows = read_metrics(prep.sft_out_dir + "/metrics.jsonl");
  curves.insert(curves.begin(), Chart{"SFT: loss (NLL per token)", "step", "loss", {metric_curve(sft_rows, "loss", "train")}});
  write_png_grid(curves, 3, (out / "training_curves.png").string());
  Series sft_point;
  sft_point.label = "SFT";
  sft_point.style = Series::Style::Points;
  sft_point.x = {0.0};
  sft_point.y = {sft_eval.reward_mean};
  write_png(Chart{"Ground-truth reward against KL(policy || SFT)", "KL (nats per completion)", "mean reward", {sft_point, frontier}},
            (out / "reward_vs_kl.png").string());

  json report = {{"task", "synthetic controlled sentiment (byte-level GPT-2)"},
                 {"seed", opt.seed},
                 {"sft", {{"reward_mean", sft_eval.reward_mean}, {"reward_sem", sft_eval.reward_sem}, {"kl", 0.0},
                          {"grammatical_fraction", sft_eval.grammatical}, {"checkpoint", sft_ckpt},
                          {"samples", sft_eval.examples}}},
                 {"dpo", best},
                 {"runs", runs},
                 {"eval_samples", eval_prompts_rep.size()},
                 {"seconds", elapsed()}};
  const std::string report_path = (out / "report.json").string();
  // Samples may hold invalid UTF-8 (a policy can emit any byte): JSON gets U+FFFD in their place.
  write_file_atomic(report_path, report.dump(2, ' ', false, json::error_handler_t::replace) + "\n");

  std::ostringstream md;
  md << "# dpo demo report\n\n"
     << "Synthetic controlled-sentiment task, byte-level GPT-2 (" << z.n_layer << " layers, width " << z.n_embd
     << "), seed " << opt.seed << ". Evaluated on " << eval_prompts_rep.size()
     << " samples from held-out prompts. KL is the sequence-level KL(policy || SFT) estimated from policy samples "
        "(nats per completion); +- is one standard error.\n\n"
     << "| policy | beta | mean reward | KL | implicit-reward accuracy (held-out pairs) | grammatical |\n"
     << "|---|---|---|---|---|---|\n"
     << "| SFT | - | " << fmt(sft_eval.reward_mean) << " +- " << fmt(sft_eval.reward_sem) << " | 0 | - | "
     << fmt(sft_eval.grammatical) << " |\n";
  for (const auto& r : runs)
    md << "| DPO | " << r["beta"].get<double>() << " | " << fmt(r["reward_mean"].get<double>()) << " +- "
       << fmt(r["reward_sem"].get<double>()) << " | " << fmt(r["kl"].get<double>()) << " +- "
       << fmt(r["kl_sem"].get<double>()) << " | " << fmt(r["implicit_reward_accuracy"].get<double>()) << " | "
       << fmt(r["grammatical_fraction"].get<double>()) << " |\n";
  md << "\nSFT samples:\n\n";
  for (const auto& s : sft_eval.examples) md << "    " << s << "\n";
  md << "\nDPO samples (beta " << best["beta"].get<double>() << "):\n\n";
  for (const auto& s : best["samples"]) md << "    " << s.get<std::string>() << "\n";
  md << "\nPlots: training_curves.png, reward_vs_kl.png. Total time " << fmt(elapsed(), 1) << " s.\n";
  write_file_atomic((out / "report.md").string(), md.str());
  std::printf("%s", md.str().c_str());
  return report_path;
}

}  // namespace dpo
