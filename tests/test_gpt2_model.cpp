// Whole-model checks of GPT2 in double: finite differences against backward for every parameter, determinism,
// accumulation, and behaviour on the boundary (token range, sequence length).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "model/gpt2.h"
#include "runtime/safetensors.h"
#include "test_fixture.h"
#include "test_util.h"

namespace dpo {
namespace {

GPT2Config tiny_config() {
  GPT2Config c;
  c.vocab_size = 13;  // not a multiple of anything
  c.max_seq_len = 9;
  c.n_embd = 12;
  c.n_head = 3;
  c.n_layer = 2;
  return c;
}

struct Inputs {
  Tensor tokens, keymask, targets, weights, dseq;
  int64_t B, T;
};

// Row 0 full, row 1 left-padded by 2, row 2 right-padded by 1; completion weights start mid-sequence and
// include a non-unit weight so the masked sum is exercised.
Inputs make_inputs(std::mt19937_64& g, const GPT2Config& c, int64_t B = 3, int64_t T = 7) {
  Inputs in{Tensor::host({B, T}, DType::I32), Tensor::host({B, T}, DType::I32), Tensor::host({B, T}, DType::I32),
            Tensor::host({B, T}, DType::F64), Tensor::host({B}, DType::F64), B, T};
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(c.vocab_size - 1));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const bool pad = (b == 1 && t < 2) || (b == 2 && t == T - 1);
      in.tokens.data<int32_t>()[b * T + t] = pad ? 0 : tok(g);
      in.keymask.data<int32_t>()[b * T + t] = pad ? 0 : 1;
    }
    for (int64_t t = 0; t < T; ++t) {
      const bool real_next = t + 1 < T && in.keymask.data<int32_t>()[b * T + t + 1] == 1;
      in.targets.data<int32_t>()[b * T + t] = real_next ? in.tokens.data<int32_t>()[b * T + t + 1] : -1;
      in.weights.data<double>()[b * T + t] = (real_next && t >= 2) ? (t == 4 ? 0.5 : 1.0) : 0.0;
    }
    in.dseq.data<double>()[b] = std::normal_distribution<double>(0, 1)(g);
  }
  return in;
}

void randomize(GPT2& m, std::mt19937_64& g, double scale) { test::randomize_f64(m, g, scale); }

double objective(GPT2& m, const Inputs& in) {
  Tensor seq = Tensor::host({in.B}, DType::F64);
  m.sequence_logprobs(in.tokens, in.keymask, in.targets, in.weights, seq);
  double s = 0;
  for (int64_t b = 0; b < in.B; ++b) s += seq.data<double>()[b] * in.dseq.data<double>()[b];
  return s;
}

TEST(Gpt2Model, FiniteDifferenceGradientEveryParameter) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m(*be, cfg, DType::F64);
  randomize(m, g, 0.3);  // large enough that every nonlinearity is away from its linear regime
  Inputs in = make_inputs(g, cfg);

  objective(m, in);
  m.zero_grad();
  m.backward(in.dseq);
  std::vector<double> analytic(m.grads().data<double>(), m.grads().data<double>() + m.grads().numel());

  std::vector<double> x(m.params().data<double>(), m.params().data<double>() + m.params().numel());
  double* p = m.params().data<double>();
  auto f = [&]() {
    std::copy(x.begin(), x.end(), p);
    return objective(m, in);
  };
  std::vector<double> numeric = test::numeric_grad(x, f);
  // Report per parameter so a failure names the culprit.
  for (const auto& s : m.specs()) {
    int64_t n = 1;
    for (int64_t d : s.shape) n *= d;
    std::vector<double> a(analytic.begin() + s.offset, analytic.begin() + s.offset + n);
    std::vector<double> b(numeric.begin() + s.offset, numeric.begin() + s.offset + n);
    // Double precision, h = 1e-6: truncation ~h^2 f''' ~ 1e-12, round-off ~ eps |f| / h ~ 1e-9 for |f| ~ 10.
    EXPECT_LT(test::max_rel_err(a, b), 1e-6) << s.name;
  }
  // The gradient is not trivially zero anywhere that matters.
  double norm = 0;
  for (double v : analytic) norm += v * v;
  EXPECT_GT(norm, 1e-3);
}

TEST(Gpt2Model, PaddingAndZeroWeightPositionsGetNoGradientFromTheirTargets) {
  // Changing a target where the weight is 0 (or the token under a padding key) must not change the loss.
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m(*be, cfg, DType::F64);
  randomize(m, g, 0.3);
  Inputs in = make_inputs(g, cfg);
  const double base = objective(m, in);
  in.targets.data<int32_t>()[0] = (in.targets.data<int32_t>()[0] + 1) % 13;  // weight 0 at t=0
  EXPECT_EQ(objective(m, in), base);
  // Row 1 is left-padded at t=0,1: a different pad token id must not leak into real positions.
  in.tokens.data<int32_t>()[1 * in.T + 0] = 7;
  EXPECT_EQ(objective(m, in), base);
}

TEST(Gpt2Model, BackwardAccumulatesAndIsBitwiseRepeatable) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m(*be, cfg, DType::F64);
  randomize(m, g, 0.3);
  Inputs in = make_inputs(g, cfg);
  const int64_t n = m.grads().numel();
  m.zero_grad();
  objective(m, in);
  m.backward(in.dseq);
  std::vector<double> once(m.grads().data<double>(), m.grads().data<double>() + n);
  objective(m, in);
  m.backward(in.dseq);
  // Not bitwise: a parameter that receives several contributions (wte: embedding and LM head; each LayerNorm's
  // input) sums them in a different grouping the second time. Two ulps of the largest gradient is the budget.
  double gmax = 0;
  for (double v : once) gmax = std::max(gmax, std::fabs(v));
  for (int64_t i = 0; i < n; ++i)
    ASSERT_NEAR(m.grads().data<double>()[i], 2.0 * once[static_cast<size_t>(i)], 4e-16 * gmax) << i;
  m.zero_grad();
  objective(m, in);
  m.backward(in.dseq);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(m.grads().data<double>()[i], once[static_cast<size_t>(i)]) << i;
}

TEST(Gpt2Model, FloatAgreesWithDouble) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m64(*be, cfg, DType::F64);
  randomize(m64, g, 0.3);
  GPT2 m32(*be, cfg, DType::F32);
  be->copy_from_host(m32.params(), m64.params());
  Inputs in = make_inputs(g, cfg);
  Tensor w32 = Tensor::host({in.B, in.T}, DType::F32), d32 = Tensor::host({in.B}, DType::F32);
  be->copy_from_host(w32, in.weights);
  be->copy_from_host(d32, in.dseq);
  Tensor s64 = Tensor::host({in.B}, DType::F64), s32 = Tensor::host({in.B}, DType::F32);
  m64.sequence_logprobs(in.tokens, in.keymask, in.targets, in.weights, s64);
  m32.sequence_logprobs(in.tokens, in.keymask, in.targets, w32, s32);
  for (int64_t b = 0; b < in.B; ++b)
    EXPECT_NEAR(s32.data<float>()[b], s64.data<double>()[b], 1e-5 * std::fabs(s64.data<double>()[b]) + 1e-6);
  m64.zero_grad();
  m32.zero_grad();
  m64.backward(in.dseq);
  m32.backward(d32);
  std::vector<double> a(m64.grads().data<double>(), m64.grads().data<double>() + m64.grads().numel());
  std::vector<double> b(a.size());
  for (size_t i = 0; i < b.size(); ++i) b[i] = m32.grads().data<float>()[i];
  // float32 eps 6e-8 through ~10 chained ops with reductions of <= 48 terms: ~1e-5 relative is the budget.
  EXPECT_LT(test::max_rel_err(b, a), 1e-5);
}

// The logits rows are padded to ldv = 64 > V = 13 (model/gpt2.h, "Logits layout"). forward()'s buffer is the one
// sequence_logprobs and backward reuse for the same (B, T), so its padding can be poisoned from outside: with NaN
// there, the log-probs and every gradient must be bitwise those of the run with zero padding (so the padding never
// enters the softmax, the log-probs or the GEMMs), and the NaN bits must survive forward and the in-place backward.
TEST(Gpt2Model, LogitsPaddingIsNeverReadOrWritten) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  Inputs in = make_inputs(g, cfg);
  std::vector<double> p64(static_cast<size_t>(cfg.num_parameters()));
  for (double& v : p64) v = std::normal_distribution<double>(0.0, 0.3)(g);
  Tensor host_p = Tensor::host({cfg.num_parameters()}, DType::F64);
  std::memcpy(host_p.raw(), p64.data(), p64.size() * sizeof(double));
  for (DType dt : {DType::F64, DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    const DType G = grad_dtype(dt);
    GPT2 m(*be, cfg, dt);
    be->copy_from_host(m.master_params(), host_p);
    m.sync_params();
    Tensor w = be->empty({in.B, in.T}, G), d = be->empty({in.B}, G);
    be->copy_from_host(w, in.weights);
    be->copy_from_host(d, in.dseq);
    const int64_t V = cfg.vocab_size, ldv = m.logits_stride();
    ASSERT_EQ(ldv, 64);
    const Tensor logits = m.forward(in.tokens, in.keymask);
    ASSERT_EQ(logits.shape(), (Shape{in.B, in.T, ldv}));
    const int64_t es = dtype_size(dt), rows = in.B * in.T;
    auto* bytes = static_cast<uint8_t*>(logits.raw());
    auto padding = [&] {
      std::vector<uint8_t> r;
      for (int64_t n = 0; n < rows; ++n) r.insert(r.end(), bytes + (n * ldv + V) * es, bytes + (n + 1) * ldv * es);
      return r;
    };
    EXPECT_EQ(padding(), std::vector<uint8_t>(static_cast<size_t>(rows * (ldv - V) * es), 0)) << "zero padding";
    auto run = [&] {
      Tensor seq = be->empty({in.B}, G), tok = be->empty({in.B, in.T}, G);
      m.zero_grad();
      m.sequence_logprobs(in.tokens, in.keymask, in.targets, w, seq, tok);
      m.backward(d);
      std::vector<double> r = to_host_f64(*be, seq), t = to_host_f64(*be, tok), gr = to_host_f64(*be, m.grads());
      r.insert(r.end(), t.begin(), t.end());
      r.insert(r.end(), gr.begin(), gr.end());
      return r;
    };
    const auto clean = run();
    // NaN in the padding of every row, in the model's dtype.
    Tensor nan = Tensor::host({rows, ldv}, DType::F64);
    for (int64_t i = 0; i < nan.numel(); ++i) nan.data<double>()[i] = std::nan("");
    const Tensor nan_dt = convert_host(nan, dt, "poison");
    for (int64_t n = 0; n < rows; ++n)
      std::memcpy(bytes + (n * ldv + V) * es, static_cast<const uint8_t*>(nan_dt.raw()) + (n * ldv + V) * es,
                  static_cast<size_t>((ldv - V) * es));
    const auto poisoned = padding();
    const auto dirty = run();
    for (double v : dirty) ASSERT_TRUE(std::isfinite(v)) << "a padding NaN was read";
    EXPECT_TRUE(test::bitwise_equal(dirty, clean));
    EXPECT_EQ(padding(), poisoned) << "forward or backward wrote into the padding";
  }
}

TEST(Gpt2Model, InitIsSeededAndFollowsGpt2Scheme) {
  auto be = make_cpu_backend();
  GPT2Config cfg = tiny_config();
  cfg.n_embd = 48;
  cfg.n_head = 4;
  cfg.vocab_size = 101;
  GPT2 a(*be, cfg, DType::F32), b(*be, cfg, DType::F32), c(*be, cfg, DType::F32);
  Rng r1(5), r2(5), r3(6);
  a.init_random(r1);
  b.init_random(r2);
  c.init_random(r3);
  const int64_t n = a.params().numel();
  EXPECT_EQ(std::memcmp(a.params().raw(), b.params().raw(), static_cast<size_t>(n) * 4), 0);
  EXPECT_NE(std::memcmp(a.params().raw(), c.params().raw(), static_cast<size_t>(n) * 4), 0);
  auto stats = [&](const std::string& name) {
    Tensor t = a.param(name);
    double s = 0, s2 = 0;
    for (int64_t i = 0; i < t.numel(); ++i) {
      s += t.data<float>()[i];
      s2 += double(t.data<float>()[i]) * t.data<float>()[i];
    }
    return std::make_pair(s / t.numel(), std::sqrt(s2 / t.numel()));
  };
  // wte has 101*48 = 4848 samples: the std estimate is within ~3% (1/sqrt(2n)) of 0.02 with overwhelming odds.
  EXPECT_NEAR(stats("wte.weight").second, 0.02, 0.02 * 0.06);
  EXPECT_NEAR(stats("h.0.mlp.c_fc.weight").second, 0.02, 0.02 * 0.06);
  EXPECT_NEAR(stats("h.1.mlp.c_proj.weight").second, 0.02 / std::sqrt(4.0), 0.01 * 0.06);
  EXPECT_EQ(stats("h.0.ln_1.weight").first, 1.0);
  EXPECT_EQ(stats("h.0.attn.c_attn.bias").second, 0.0);
}

TEST(Gpt2Model, RejectsTokensOutsideVocabularyAndOverlongSequences) {
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m(*be, cfg, DType::F32);
  Tensor tok = Tensor::host({1, 3}, DType::I32);
  tok.data<int32_t>()[1] = 13;
  EXPECT_THROW(m.forward(tok, Tensor()), InputError);
  tok.data<int32_t>()[1] = -1;
  EXPECT_THROW(m.forward(tok, Tensor()), InputError);
  Tensor longer = Tensor::host({1, cfg.max_seq_len + 1}, DType::I32);
  EXPECT_THROW(m.forward(longer, Tensor()), InputError);
  Tensor ok = Tensor::host({2, cfg.max_seq_len}, DType::I32);
  EXPECT_NO_THROW(m.forward(ok, Tensor()));
}

TEST(Gpt2Model, ParameterLayoutMatchesHfCount) {
  // GPT-2 124M: 124,439,808 parameters with the tied head (HF's num_parameters()).
  GPT2Config c;  // defaults are GPT-2 small
  EXPECT_EQ(c.num_parameters(), 124439808);
  auto specs = gpt2_param_specs(c);
  EXPECT_EQ(specs.size(), 2u + 12u * 12u + 2u);
  EXPECT_EQ(specs.back().offset + 768, c.num_parameters());
  GPT2Config bad = c;
  bad.n_head = 7;
  EXPECT_THROW(bad.validate("cfg"), InputError);
}

}  // namespace
// --- fusions (model/gpt2.h, Fusions) -------------------------------------------------------------------------------

struct StepResult {
  std::vector<uint8_t> seq_logp, grads;
  std::vector<double> grads_f64;
};

// sequence_logprobs + backward on a model of dtype dt whose parameters are m64's, with the given fusions.
StepResult run_step(Backend& be, const GPT2Config& cfg, DType dt, const GPT2& m64, const Inputs& in,
                    const Fusions& f) {
  GPT2 m(be, cfg, dt);
  m.set_fusions(f);
  be.copy_from_host(m.master_params(), m64.params());
  m.sync_params();
  const DType G = grad_dtype(dt);
  Tensor w = Tensor::host({in.B, in.T}, G), d = Tensor::host({in.B}, G), seq = Tensor::host({in.B}, G);
  be.copy_from_host(w, in.weights);
  be.copy_from_host(d, in.dseq);
  m.zero_grad();
  m.sequence_logprobs(in.tokens, in.keymask, in.targets, w, seq);
  m.backward(d);
  auto bytes = [](const Tensor& t) {
    const auto* p = static_cast<const uint8_t*>(t.raw());
    return std::vector<uint8_t>(p, p + t.nbytes());
  };
  const Tensor g64 = convert_host(m.grads(), DType::F64, "grads");
  return {bytes(seq), bytes(m.grads()), {g64.data<double>(), g64.data<double>() + g64.numel()}};
}

// Every fusion on against every fusion off, on the CPU: the log-probs and every parameter gradient bitwise equal in
// F64 and F32 (where the GELU fusion is off by definition), and in BF16 with everything but the GELU fusion (which
// changes BF16 rounding by design, runtime/backend.h): there, close.
TEST(Gpt2Model, FusionsOnAndOffGiveBitwiseEqualGradients) {
  std::mt19937_64 g(test::test_seed());
  auto be = make_cpu_backend();
  const GPT2Config cfg = tiny_config();
  GPT2 m64(*be, cfg, DType::F64);
  randomize(m64, g, 0.3);
  const Inputs in = make_inputs(g, cfg);
  for (DType dt : {DType::F64, DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    const StepResult off = run_step(*be, cfg, dt, m64, in, Fusions::none());
    Fusions bitwise = Fusions::all();
    bitwise.gelu_epilogue = dt != DType::BF16;  // a no-op in F32 / F64; changes rounding in BF16
    const StepResult on = run_step(*be, cfg, dt, m64, in, bitwise);
    EXPECT_EQ(on.seq_logp, off.seq_logp);
    EXPECT_EQ(on.grads, off.grads);
    double gmax = 0;
    for (double v : off.grads_f64) gmax = std::max(gmax, std::fabs(v));
    EXPECT_GT(gmax, 1e-3);  // not trivially zero
    if (dt == DType::BF16) {
      const StepResult all = run_step(*be, cfg, dt, m64, in, Fusions::all());
      // The GELU fusion moves a few BF16 roundings (about 2^-9 relative each, runtime/backend.h) in the MLP of each
      // layer; through two layers the gradients move by a few BF16 ulps of the largest gradient (measured: 0.24% of
      // the largest). 2% of the largest is that with margin; a fusion that drops gelu' or the bias changes gradients
      // by O(100%).
      for (size_t i = 0; i < all.grads_f64.size(); ++i)
        ASSERT_NEAR(all.grads_f64[i], off.grads_f64[i], 0.02 * gmax) << i;
    }
  }
}

TEST(Gpt2Model, FusionsParseAllNoneAndListsAndRejectUnknownNames) {
  EXPECT_EQ(Fusions::parse(""), Fusions::defaults());
  EXPECT_FALSE(Fusions::defaults().gelu_epilogue);  // off until checked on a GPU (model/gpt2.h)
  EXPECT_EQ(Fusions::parse("all"), Fusions::all());
  EXPECT_EQ(Fusions::parse("none"), Fusions::none());
  const Fusions f = Fusions::parse("overwrite_grads,gelu_epilogue");
  EXPECT_FALSE(f.residual_layernorm);
  EXPECT_TRUE(f.overwrite_grads);
  EXPECT_TRUE(f.gelu_epilogue);
  try {
    Fusions::parse("residual_layernorm,fast");
    ADD_FAILURE() << "no error for an unknown fusion";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("DPO_FUSIONS"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("fast"), std::string::npos) << e.what();
  }
}

}  // namespace dpo
