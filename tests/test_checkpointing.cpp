// Activation recomputation (GPT2::set_gradient_checkpointing): on the CPU, in float, double and bf16 (emulated),
// the gradients and every output of a training pass are BITWISE those of the stored-activation path (interval 0),
// because the recomputed forward is the forward's own ops in the same order on the same inputs. Covered: the
// unfused head (sequence_logprobs + backward) on rows with left and right padding, the chunked head with a host
// loss callback (fused_forward), the device loss (fused_forward_pairs) on padded, packed and prefix_shared
// batches, gradient accumulation over two micro-batches, intervals 1, 2, 3 and n_layer (5 layers: segments that
// do and do not divide the depth), fusions all and none, forward-only scoring and the decoding prefill; and the
// trainer, whose weights after 3 steps are bitwise equal with the key on and off. The model tests run on GPT-2 and on
// the Llama family.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "model/gpt2.h"
#include "test_fixture.h"
#include "test_util.h"
#include "train/config.h"
#include "train/data.h"
#include "train/loss.h"
#include "train/reference.h"
#include "train/trainer.h"

namespace dpo {
namespace {

constexpr int64_t kLayers = 5;

// GPT-2, or (llama) the Llama family with grouped-query heads (3 heads, 1 key/value head), q/k/v biases, an untied
// head and Llama 3 rope scaling: every op of its blocks is rerun by the recomputation.
GPT2Config ckpt_config(bool llama = false) {
  GPT2Config c;
  c.vocab_size = 29;  // not a multiple of anything
  c.max_seq_len = 48;
  c.n_embd = 12;
  c.n_head = 3;
  c.n_layer = kLayers;
  if (llama) {
    c.arch = Arch::Llama;
    c.model_type = "qwen2";
    c.n_kv_head = 1;
    c.intermediate_size = 10;
    c.attention_bias = true;
    c.tie_word_embeddings = false;
    c.rope_scaling = RopeScaling{8, 1, 4, 16};
  }
  return c;
}

// N(0, 0.3) parameters (every nonlinearity away from its linear regime): into the master copy (the parameters
// themselves in F32 / F64), then rounded into the BF16 compute copy.
void randomize(GPT2& m, std::mt19937_64& g) {
  std::normal_distribution<double> d(0.0, 0.3);
  const Tensor& p = m.master_params();
  for (int64_t i = 0; i < p.numel(); ++i) {
    if (p.dtype() == DType::F64) p.data<double>()[i] = d(g);
    else p.data<float>()[i] = static_cast<float>(d(g));
  }
  m.sync_params();
}

// The raw bytes of a host tensor: the comparisons below are bitwise, NaN payloads and signed zeros included.
std::string bytes_of(const Tensor& t) {
  return std::string(static_cast<const char*>(t.raw()), static_cast<size_t>(t.nbytes()));
}

// One training pass's observable results: whatever it outputs, then the gradients.
struct Result {
  std::string out, grads;
};

// A training pass under test, run on a model whose gradients were zeroed; returns its outputs.
using Pass = std::function<std::string(GPT2&)>;

const int64_t kIntervals[] = {1, 2, 3, kLayers};

// Runs `pass` with interval 0 and with each interval in kIntervals, under fusions all and none, and expects every
// result bitwise equal to interval 0's under the same fusions. The reference pass must produce a nonzero gradient,
// so that a layer whose gradient the recomputing backward fails to write (left 0) or writes wrongly shows.
void expect_bitwise(GPT2& m, const Pass& pass) {
  for (const Fusions& f : {Fusions::all(), Fusions::none()}) {
    SCOPED_TRACE(f == Fusions::all() ? "fusions all" : "fusions none");
    m.set_fusions(f);
    auto run = [&](int64_t interval) {
      m.set_gradient_checkpointing(interval);
      m.zero_grad();
      Result r;
      r.out = pass(m);
      r.grads = bytes_of(m.grads());
      return r;
    };
    const Result want = run(0);
    double norm = 0;
    for (int64_t i = 0; i < m.grads().numel(); ++i) {
      const double v = m.grads().dtype() == DType::F64 ? m.grads().data<double>()[i] : m.grads().data<float>()[i];
      norm += v * v;
    }
    ASSERT_GT(norm, 1e-8) << "the pass produced no gradient: nothing would be compared";
    for (int64_t interval : kIntervals) {
      SCOPED_TRACE("interval " + std::to_string(interval));
      const Result got = run(interval);
      EXPECT_TRUE(got.out == want.out) << "outputs differ";
      EXPECT_TRUE(got.grads == want.grads) << "gradients differ";
    }
  }
  m.set_gradient_checkpointing(0);
}

struct Padded {
  Tensor tokens, keymask, targets, weights, dseq;
  int64_t B, T;
};

// B rows of T tokens: row 1 left-padded by 3, row 2 right-padded by 2, the others full; completion weights from
// slot 2 on, one of them 0.5.
Padded padded_inputs(std::mt19937_64& g, const GPT2Config& c, DType wdt, int64_t B, int64_t T) {
  Padded in{Tensor::host({B, T}, DType::I32), Tensor::host({B, T}, DType::I32), Tensor::host({B, T}, DType::I32),
            Tensor::host({B, T}, wdt), Tensor::host({B}, wdt), B, T};
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(c.vocab_size - 1));
  std::normal_distribution<double> nd(0.0, 1.0);
  auto put = [&](const Tensor& t, int64_t i, double v) {
    if (wdt == DType::F64) t.data<double>()[i] = v;
    else t.data<float>()[i] = static_cast<float>(v);
  };
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const bool pad = (b == 1 && t < 3) || (b == 2 && t >= T - 2);
      in.tokens.data<int32_t>()[b * T + t] = pad ? 0 : tok(g);
      in.keymask.data<int32_t>()[b * T + t] = pad ? 0 : 1;
    }
    for (int64_t t = 0; t < T; ++t) {
      const bool real = in.keymask.data<int32_t>()[b * T + t] == 1;
      const bool real_next = real && t + 1 < T && in.keymask.data<int32_t>()[b * T + t + 1] == 1;
      in.targets.data<int32_t>()[b * T + t] = real_next ? in.tokens.data<int32_t>()[b * T + t + 1] : -1;
      put(in.weights, b * T + t, (real_next && t >= 2) ? (t == 4 ? 0.5 : 1.0) : 0.0);
    }
    put(in.dseq, b, nd(g));
  }
  return in;
}

// (dtype, Llama family)
class Checkpointing : public ::testing::TestWithParam<std::tuple<DType, bool>> {};

// The unfused head: sequence_logprobs (with per-token log-probs and statistics) + backward, left and right padding.
TEST_P(Checkpointing, UnfusedHeadPaddedLeftAndRight) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const DType dt = std::get<0>(GetParam());
  GPT2 m(*be, ckpt_config(std::get<1>(GetParam())), dt);
  randomize(m, g);
  const Padded in = padded_inputs(g, m.config(), grad_dtype(dt), 4, 11);
  expect_bitwise(m, [&](GPT2& mm) {
    const DType gd = grad_dtype(dt);
    Tensor seq = Tensor::host({in.B}, gd), tok = Tensor::host({in.B, in.T}, gd),
           stats = Tensor::host({in.B, kSeqStatsWidth}, gd);
    mm.sequence_logprobs(in.tokens, in.keymask, in.targets, in.weights, seq, tok, stats);
    mm.backward(in.dseq);
    return bytes_of(seq) + bytes_of(tok) + bytes_of(stats);
  });
}

// The chunked head with a host loss callback (pairs in one chunk and one pair per chunk), compaction on and off.
TEST_P(Checkpointing, ChunkedHeadWithHostLoss) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const DType dt = std::get<0>(GetParam());
  GPT2 m(*be, ckpt_config(std::get<1>(GetParam())), dt);
  randomize(m, g);
  const Padded in = padded_inputs(g, m.config(), grad_dtype(dt), 6, 9);
  for (HeadRows rows : {HeadRows::Scored, HeadRows::All})
    for (int64_t chunk : {int64_t{1}, int64_t{1} << 20}) {
      SCOPED_TRACE(std::string(rows == HeadRows::Scored ? "scored rows" : "all rows") + ", chunk rows " +
                   std::to_string(chunk));
      m.set_head_rows(rows);
      m.set_logits_chunk_rows(chunk);
      expect_bitwise(m, [&](GPT2& mm) {
        GPT2::LossHead head;
        head.pair_stride = in.B / 2;
        head.grad = [&](int64_t u0, int64_t u1, const std::vector<double>& logp, std::vector<double>& dseq) {
          for (int64_t q = u0; q < u1; ++q) {  // d/dlogp of -log sigmoid(logp_c - logp_r)
            const auto c = static_cast<size_t>(q), r = static_cast<size_t>(q + head.pair_stride);
            const double s = 1.0 / (1.0 + std::exp(logp[c] - logp[r]));
            dseq[c] = -s;
            dseq[r] = s;
          }
        };
        std::vector<double> stats;
        const std::vector<double> logp = mm.fused_forward(in.tokens, in.keymask, in.targets, in.weights, head, &stats);
        mm.fused_backward();
        std::string out(reinterpret_cast<const char*>(logp.data()), logp.size() * sizeof(double));
        return out + std::string(reinterpret_cast<const char*>(stats.data()), stats.size() * sizeof(double));
      });
    }
}

// The device loss (fused_forward_pairs) on one micro-batch, or two accumulated, in each batch layout.
struct PairsCase {
  std::vector<PreferencePair> data;
  LossConfig lc;
  std::vector<double> ref_c, ref_r;
};

PairsCase pairs_case(std::mt19937_64& g, int32_t vocab) {
  PairsCase pc;
  pc.data = test::random_pairs(g, 8, vocab);
  for (size_t i = 0; i < pc.data.size(); ++i) {
    pc.ref_c.push_back(-20.0 - static_cast<double>(i));
    pc.ref_r.push_back(-18.0 + 0.5 * static_cast<double>(i));
  }
  pc.lc.beta = 0.3;
  pc.lc.odpo_alpha = 0.5;
  pc.lc.terms = {{LossType::Sigmoid, 1.0}, {LossType::Sft, 0.3}};
  return pc;
}

std::string pairs_pass(GPT2& m, const PairsCase& pc, const Batch& b) {
  Backend& be = m.backend();
  const DType gd = grad_dtype(m.dtype());
  const int64_t P = b.pairs;
  const PairRows rows = b.layout == BatchLayout::Padded ? PairRows::Blocked : PairRows::Interleaved;
  Tensor ref = Tensor::host({2 * P}, gd), off = Tensor::host({P}, gd);
  auto put = [&](const Tensor& t, int64_t i, double v) {
    if (gd == DType::F64) t.data<double>()[i] = v;
    else t.data<float>()[i] = static_cast<float>(v);
  };
  for (int64_t q = 0; q < P; ++q) {
    const auto i = static_cast<size_t>(b.indices[static_cast<size_t>(q)]);
    put(ref, pair_row(rows, P, q, 0), pc.ref_c[i]);
    put(ref, pair_row(rows, P, q, 1), pc.ref_r[i]);
    put(off, q, odpo_offset(pc.lc.odpo_alpha, b.score_chosen[static_cast<size_t>(q)],
                            b.score_rejected[static_cast<size_t>(q)]));
  }
  GPT2::PairLossHead head;
  head.ref_logp = ref;
  head.offset = off;
  head.params = pair_loss_params(pc.lc);
  head.normalizer = 2.0 * static_cast<double>(P) + 1;
  head.sums = Tensor::host({kPairSumsWidth}, DType::F64);
  head.stats = Tensor::host({2 * P, kSeqStatsWidth}, gd);
  head.pair_loss = Tensor::host({P}, gd);
  const LayoutScope scope(m, b);
  (void)be;
  m.fused_forward_pairs(b.tokens, b.keymask, b.targets, b.weights, head);
  m.fused_backward();
  return bytes_of(head.sums) + bytes_of(head.stats) + bytes_of(head.pair_loss);
}

TEST_P(Checkpointing, DeviceLossEveryLayoutAndAccumulation) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const DType dt = std::get<0>(GetParam());
  GPT2 m(*be, ckpt_config(std::get<1>(GetParam())), dt);
  randomize(m, g);
  const PairsCase pc = pairs_case(g, static_cast<int32_t>(m.config().vocab_size));
  const std::vector<int64_t> first = {3, 0, 6, 1}, second = {5, 2, 7, 4};
  for (BatchLayout layout : {BatchLayout::Padded, BatchLayout::Packed, BatchLayout::PrefixShared}) {
    SCOPED_TRACE(batch_layout_name(layout));
    auto batch = [&](const std::vector<int64_t>& idx) {
      return make_layout_batch(pc.data, idx, layout, 40, grad_dtype(dt), 0);
    };
    const Batch b1 = batch(first), b2 = batch(second);
    m.set_logits_chunk_rows(16);  // several chunks per batch
    expect_bitwise(m, [&](GPT2& mm) { return pairs_pass(mm, pc, b1); });
    {
      SCOPED_TRACE("two accumulated micro-batches");
      expect_bitwise(m, [&](GPT2& mm) { return pairs_pass(mm, pc, b1) + pairs_pass(mm, pc, b2); });
    }
  }
}

// Forward-only paths: score() and the decoding prefill (whose key/value cache is filled block by block while the
// scratch set is reused) give bitwise the results of interval 0; the decode step after the prefill reads that cache.
TEST_P(Checkpointing, ScoreAndPrefillAreUnchanged) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const DType dt = std::get<0>(GetParam());
  GPT2 m(*be, ckpt_config(std::get<1>(GetParam())), dt);
  randomize(m, g);
  const Padded in = padded_inputs(g, m.config(), grad_dtype(dt), 4, 10);
  auto score = [&]() {
    const DType gd = grad_dtype(dt);
    Tensor seq = Tensor::host({in.B}, gd), stats = Tensor::host({in.B, kSeqStatsWidth}, gd);
    std::memset(seq.raw(), 0xff, static_cast<size_t>(seq.nbytes()));  // poisoned: NaN in f32 and f64
    m.score(in.tokens, in.keymask, in.targets, in.weights, seq, stats);
    return bytes_of(seq) + bytes_of(stats);
  };
  // Right-padded prompts for the prefill: row b has 10 - b real tokens.
  std::vector<int64_t> lengths;
  for (int64_t b = 0; b < in.B; ++b) lengths.push_back(in.T - b);
  Tensor prompt = Tensor::host({in.B, in.T}, DType::I32);
  std::memcpy(prompt.raw(), in.tokens.raw(), static_cast<size_t>(prompt.nbytes()));
  auto prefill = [&]() {
    std::string out = bytes_of(m.decode_prefill(prompt, lengths, in.T + 3));
    const std::vector<int32_t> next = {1, 2, 3, 4};
    std::vector<int64_t> pos = lengths;
    out += bytes_of(m.decode_step(next, pos));  // reads the cache the prefill filled, block by block
    m.decode_end();
    return out;
  };
  for (const Fusions& f : {Fusions::all(), Fusions::none()}) {
    m.set_fusions(f);
    m.set_gradient_checkpointing(0);
    const std::string want_score = score(), want_prefill = prefill();
    for (int64_t interval : kIntervals) {
      SCOPED_TRACE("interval " + std::to_string(interval));
      m.set_gradient_checkpointing(interval);
      EXPECT_TRUE(score() == want_score);
      EXPECT_TRUE(prefill() == want_prefill);
    }
  }
}

// BF16: the CPU's emulation (every op in float, each result rounded to bf16), where gelu_epilogue also applies.
INSTANTIATE_TEST_SUITE_P(Dtypes, Checkpointing,
                         ::testing::Combine(::testing::Values(DType::F32, DType::F64, DType::BF16), ::testing::Bool()),
                         [](const ::testing::TestParamInfo<std::tuple<DType, bool>>& i) {
                           return std::string(dtype_name(std::get<0>(i.param))) +
                                  (std::get<1>(i.param) ? "_llama" : "_gpt2");
                         });

TEST(CheckpointingModel, RejectsNegativeInterval) {
  auto be = make_cpu_backend();
  GPT2 m(*be, ckpt_config(), DType::F32);
  EXPECT_THROW(m.set_gradient_checkpointing(-1), Error);
  EXPECT_EQ(m.gradient_checkpointing(), 0);
  const int64_t gen = m.buffers_generation();
  m.set_gradient_checkpointing(2);
  EXPECT_EQ(m.gradient_checkpointing(), 2);
  EXPECT_GT(m.buffers_generation(), gen);  // the old buffers were released
}

// The trainer: 3 optimizer steps of 2 accumulated micro-batches with a live reference; the key on (intervals 1
// and 2) or off gives bitwise equal weights and optimizer state, and the training moved the weights.
TEST(CheckpointingTrainer, WeightsBitwiseEqualWithKeyOnAndOff) {
  test::ScratchDir w("dpo_ckpt_");
  test::write_tiny_fixture(w.dir.string(), 22);
  TrainConfig base;
  base.model = w / "base";
  base.train_file = w / "pref.jsonl";
  base.ref_cache_dir = w / "cache";
  base.max_length = 32;
  base.learning_rate = 1e-2;
  base.per_device_train_batch_size = 3;
  base.gradient_accumulation_steps = 2;
  base.max_steps = 3;
  base.logging_steps = 1;
  base.seed = 11;
  base.precompute_ref_log_probs = false;
  base.out_dir = w / "off";
  RunOptions ro;
  ro.quiet = true;
  const RunSummary off = run_training(base, RunKind::Dpo, ro);
  ASSERT_EQ(off.steps, 3);
  const std::string want = test::slurp(off.final_checkpoint + "/model.safetensors");
  ASSERT_FALSE(want.empty());
  EXPECT_NE(test::checkpoint_weights(w / "base"), test::checkpoint_weights(off.final_checkpoint));
  for (int64_t interval : {int64_t{1}, int64_t{2}}) {
    SCOPED_TRACE("interval " + std::to_string(interval));
    TrainConfig c = base;
    c.gradient_checkpointing = true;
    c.gradient_checkpointing_interval = interval;
    c.out_dir = w / ("on" + std::to_string(interval));
    const RunSummary on = run_training(c, RunKind::Dpo, ro);
    ASSERT_EQ(on.steps, 3);
    EXPECT_TRUE(test::slurp(on.final_checkpoint + "/model.safetensors") == want);
    EXPECT_TRUE(test::slurp(on.final_checkpoint + "/optimizer.safetensors") ==
                test::slurp(off.final_checkpoint + "/optimizer.safetensors"));
    EXPECT_EQ(on.last_log.at("loss"), off.last_log.at("loss"));
  }
}

TEST(CheckpointingConfig, KeysParseValidateAndDefault) {
  const TrainConfig d;
  EXPECT_FALSE(d.gradient_checkpointing);
  EXPECT_EQ(d.gradient_checkpointing_interval, 1);
  const std::vector<std::string> need = {"model=m", "train_file=t", "out_dir=o"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), need.begin(), need.end());
    return load_train_config("", extra, RunKind::Dpo);
  };
  const TrainConfig c = with({"gradient_checkpointing=true", "gradient_checkpointing_interval=3"});
  EXPECT_TRUE(c.gradient_checkpointing);
  EXPECT_EQ(c.gradient_checkpointing_interval, 3);
  try {
    with({"gradient_checkpointing_interval=0"});
    FAIL() << "interval 0 accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("gradient_checkpointing_interval"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dpo
