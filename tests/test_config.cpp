// YAML config + key=value overrides: every error names the key and where it came from.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "runtime/error.h"
#include "train/config.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;

std::string write_yaml(const std::string& text) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string path = (fs::path(::testing::TempDir()) / (std::string("cfg_") + info->name() + ".yaml")).string();
  std::ofstream(path) << text;
  return path;
}

const std::vector<std::string> kRequired = {"model=m", "train_file=t.jsonl", "out_dir=o"};

std::string error_of(const std::string& path, std::vector<std::string> ov, RunKind kind = RunKind::Dpo) {
  try {
    load_train_config(path, ov, kind);
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST(Config, FileThenOverridesAndLists) {
  const std::string p = write_yaml("model: base\ntrain_file: d.jsonl\nout_dir: run\nbeta: 0.25\n"
                                   "loss_type: [sigmoid, sft]\nloss_weights: [1, 0.5]\nlearning_rate: 5e-7\n");
  TrainConfig c = load_train_config(p, {"beta=0.5", "per_device_train_batch_size=3"}, RunKind::Dpo);
  EXPECT_EQ(c.model, "base");
  EXPECT_EQ(c.beta, 0.5);  // the override wins
  EXPECT_EQ(c.per_device_train_batch_size, 3);
  EXPECT_EQ(c.loss_type, (std::vector<std::string>{"sigmoid", "sft"}));
  EXPECT_EQ(c.loss_weights, (std::vector<double>{1.0, 0.5}));
  EXPECT_EQ(c.learning_rate, 5e-7);
  TrainConfig d = load_train_config("", {"model=base", "train_file=d.jsonl", "out_dir=run", "loss_type=ipo"},
                                    RunKind::Dpo);
  EXPECT_EQ(d.loss_type, (std::vector<std::string>{"ipo"}));  // a scalar where a list is allowed
}

TEST(Config, UnknownKeyNamesFileLineAndSuggests) {
  const std::string p = write_yaml("model: base\nbta: 0.1\n");
  const std::string e = error_of(p, kRequired);
  EXPECT_NE(e.find(p + ":2"), std::string::npos) << e;
  EXPECT_NE(e.find("unknown key 'bta'"), std::string::npos) << e;
  EXPECT_NE(e.find("did you mean 'beta'"), std::string::npos) << e;
  const std::string o = error_of("", {"lr=1"});
  EXPECT_NE(o.find("override 'lr=1'"), std::string::npos) << o;
  EXPECT_NE(o.find("learning_rate"), std::string::npos) << o;
}

TEST(Config, WrongTypesAreRejectedWithTheKey) {
  const std::string p = write_yaml("max_length: twelve\n");
  const std::string e = error_of(p, kRequired);
  EXPECT_NE(e.find(p + ":1"), std::string::npos) << e;
  EXPECT_NE(e.find("key 'max_length'"), std::string::npos) << e;
  EXPECT_NE(error_of("", {"beta=abc"}).find("key 'beta'"), std::string::npos);
  EXPECT_NE(error_of("", {"skip_malformed=maybe"}).find("key 'skip_malformed'"), std::string::npos);
  EXPECT_NE(error_of("", {"max_length=1.5"}).find("key 'max_length'"), std::string::npos);
  EXPECT_NE(error_of("", {"model=[a, b]"}).find("key 'model'"), std::string::npos);
  EXPECT_NE(error_of("", {"noequals"}).find("expected key=value"), std::string::npos);
}

TEST(Config, OutOfRangeValuesNameTheKey) {
  auto with = [](std::vector<std::string> extra) {
    std::vector<std::string> ov = kRequired;
    ov.insert(ov.end(), extra.begin(), extra.end());
    return error_of("", ov);
  };
  EXPECT_NE(with({"beta=0"}).find("key 'beta'"), std::string::npos);
  EXPECT_NE(with({"beta=-1"}).find("key 'beta'"), std::string::npos);
  EXPECT_NE(with({"learning_rate=-1e-5"}).find("key 'learning_rate'"), std::string::npos);
  EXPECT_NE(with({"max_length=128", "max_prompt_length=128"}).find("key 'max_prompt_length'"), std::string::npos);
  EXPECT_NE(with({"label_smoothing=0.5"}).find("key 'label_smoothing'"), std::string::npos);
  EXPECT_NE(with({"adam_beta2=1"}).find("key 'adam_beta2'"), std::string::npos);
  EXPECT_NE(with({"lr_scheduler_type=step"}).find("key 'lr_scheduler_type'"), std::string::npos);
  EXPECT_NE(with({"truncation_mode=middle"}).find("key 'truncation_mode'"), std::string::npos);
  EXPECT_NE(with({"truncation=trl2"}).find("key 'truncation'"), std::string::npos);
  EXPECT_NE(with({"loss_weights=[1,2]"}).find("key 'loss_weights'"), std::string::npos);
  EXPECT_NE(with({"max_steps=0"}).find("key 'max_steps'"), std::string::npos);
  EXPECT_NE(with({"device=tpu"}).find("key 'device'"), std::string::npos);
  EXPECT_NE(with({"per_device_train_batch_size=0"}).find("key 'per_device_train_batch_size'"), std::string::npos);
  EXPECT_EQ(with({"beta=0.01"}), "");
}

// attn_implementation (HF's key): eager by default; flash only with device cuda and precision bf16 (fp32 is the parity
// mode), each refusal naming the key and what it needs.
TEST(Config, AttnImplementationNeedsCudaAndBf16) {
  auto with = [](std::vector<std::string> extra) {
    std::vector<std::string> ov = kRequired;
    ov.insert(ov.end(), extra.begin(), extra.end());
    return error_of("", ov);
  };
  EXPECT_EQ(load_train_config("", kRequired, RunKind::Dpo).attn_implementation, "eager");
  EXPECT_EQ(with({"attn_implementation=eager"}), "");
  const std::string unknown = with({"attn_implementation=sdpa"});
  EXPECT_NE(unknown.find("key 'attn_implementation'"), std::string::npos) << unknown;
  EXPECT_NE(unknown.find("eager, flash"), std::string::npos) << unknown;
  const std::string cpu = with({"attn_implementation=flash", "precision=bf16"});
  EXPECT_NE(cpu.find("key 'attn_implementation'"), std::string::npos) << cpu;
  EXPECT_NE(cpu.find("device: cuda"), std::string::npos) << cpu;
  const std::string fp32 = with({"attn_implementation=flash", "device=cuda"});
  EXPECT_NE(fp32.find("key 'attn_implementation'"), std::string::npos) << fp32;
  EXPECT_NE(fp32.find("precision: bf16"), std::string::npos) << fp32;
  EXPECT_EQ(with({"attn_implementation=flash", "device=cuda", "precision=bf16"}), "");
}

TEST(Config, RequiredKeys) {
  EXPECT_NE(error_of("", {"train_file=t", "out_dir=o"}).find("key 'model'"), std::string::npos);
  EXPECT_NE(error_of("", {"model=m", "out_dir=o"}).find("key 'train_file'"), std::string::npos);
  EXPECT_NE(error_of("", {"model=m", "train_file=t"}).find("key 'out_dir'"), std::string::npos);
}

// truncation: trl1 (TRL 1.x) is the default; a config that sets max_prompt_length (a key TRL 1.x does not have)
// keeps the legacy rule; contradictions name the key and what to set.
TEST(Config, TruncationDefaultsAndItsErrors) {
  auto load = [](std::vector<std::string> extra) {
    std::vector<std::string> ov = kRequired;
    ov.insert(ov.end(), extra.begin(), extra.end());
    return load_train_config("", ov, RunKind::Dpo);
  };
  auto with = [](std::vector<std::string> extra) {
    std::vector<std::string> ov = kRequired;
    ov.insert(ov.end(), extra.begin(), extra.end());
    return error_of("", ov);
  };
  const TrainConfig d = load({});
  EXPECT_EQ(d.truncation, "trl1");
  EXPECT_EQ(d.truncation_mode, "keep_start");
  EXPECT_EQ(d.max_prompt_length, 0);
  const TrainConfig old = load({"max_prompt_length=100"});  // an existing config keeps working, as before
  EXPECT_EQ(old.truncation, "legacy");
  EXPECT_EQ(old.truncation_mode, "keep_end");
  EXPECT_EQ(old.max_prompt_length, 100);
  const TrainConfig leg = load({"truncation=legacy"});  // today's rule with its defaults
  EXPECT_EQ(leg.truncation_mode, "keep_end");
  EXPECT_EQ(leg.max_prompt_length, 256);
  EXPECT_EQ(load({"truncation=legacy", "max_length=200"}).max_prompt_length, 100);
  EXPECT_EQ(load({"truncation=legacy", "truncation_mode=keep_start"}).truncation_mode, "keep_start");
  EXPECT_EQ(load({"truncation=trl1", "truncation_mode=keep_start", "max_prompt_length=0"}).truncation, "trl1");
  const std::string both = with({"truncation=trl1", "max_prompt_length=100"});
  for (const char* part : {"override 'max_prompt_length=100'", "key 'max_prompt_length'", "truncation: legacy",
                           "TRL 1.x"})
    EXPECT_NE(both.find(part), std::string::npos) << both << " lacks " << part;
  const std::string ke = with({"truncation_mode=keep_end"});
  for (const char* part : {"key 'truncation_mode'", "keep_start", "truncation: legacy"})
    EXPECT_NE(ke.find(part), std::string::npos) << ke << " lacks " << part;
  EXPECT_EQ(with({"truncation=legacy", "truncation_mode=keep_end"}), "");
  EXPECT_EQ(with({"max_prompt_length=10", "truncation_mode=keep_end"}), "");
  // The resolved keys round-trip through config.yaml.
  for (const TrainConfig& c : {d, old, leg}) {
    const std::string y = to_yaml(c);
    EXPECT_EQ(to_yaml(load_train_config(write_yaml(y), {}, RunKind::Dpo)), y);
  }
}

// transformers' "constant" has no warmup; here constant with warmup_steps > 0 is refused, naming the fix.
TEST(Config, SchedulerNamesFollowTransformers) {
  auto with = [](std::vector<std::string> extra) {
    std::vector<std::string> ov = kRequired;
    ov.insert(ov.end(), extra.begin(), extra.end());
    return error_of("", ov);
  };
  const std::string e = with({"warmup_steps=10"});  // lr_scheduler_type defaults to constant
  for (const char* part : {"key 'warmup_steps'", "constant", "constant_with_warmup"})
    EXPECT_NE(e.find(part), std::string::npos) << e << " lacks " << part;
  EXPECT_EQ(with({"lr_scheduler_type=constant_with_warmup", "warmup_steps=10"}), "");
  EXPECT_EQ(with({"lr_scheduler_type=linear", "warmup_steps=10"}), "");
  EXPECT_EQ(with({"lr_scheduler_type=cosine", "warmup_steps=10"}), "");
  EXPECT_EQ(with({"lr_scheduler_type=constant", "warmup_steps=0"}), "");
}

TEST(Config, IpoIsLengthNormalisedByDefault) {
  EXPECT_TRUE(TrainConfig{}.ipo_length_normalize);
  std::vector<std::string> ov = kRequired;
  ov.push_back("loss_type=ipo");
  EXPECT_TRUE(load_train_config("", ov, RunKind::Dpo).ipo_length_normalize);
  ov.push_back("ipo_length_normalize=false");  // the IPO paper's summed form, by its explicit key
  EXPECT_FALSE(load_train_config("", ov, RunKind::Dpo).ipo_length_normalize);
}

TEST(Config, SftIgnoresDpoOnlyRanges) {
  // beta is meaningless for SFT, so an SFT config is not rejected for it.
  std::vector<std::string> ov = kRequired;
  ov.push_back("beta=0");
  EXPECT_EQ(error_of("", ov, RunKind::Sft), "");
  EXPECT_NE(error_of("", ov, RunKind::Dpo), "");
}

TEST(Config, YamlRoundTripIsExact) {
  TrainConfig c = load_train_config("", {"model=m", "train_file=t", "out_dir=o", "beta=0.1", "learning_rate=3e-4",
                                         "loss_type=[sigmoid, sft]", "loss_weights=[1, 0.3]"},
                                    RunKind::Dpo);
  const std::string y = to_yaml(c);
  EXPECT_NE(y.find("beta: 0.1\n"), std::string::npos) << y;  // shortest form, not 0.10000000000000001
  TrainConfig d = load_train_config(write_yaml(y), {}, RunKind::Dpo);
  EXPECT_EQ(to_yaml(d), y);
  EXPECT_EQ(d.learning_rate, 3e-4);
  EXPECT_EQ(d.loss_weights, (std::vector<double>{1.0, 0.3}));
}

TEST(Config, BadYamlAndNonMapping) {
  EXPECT_NE(error_of(write_yaml("a: [1, 2\n"), kRequired).find("not valid YAML"), std::string::npos);
  EXPECT_NE(error_of(write_yaml("- 1\n- 2\n"), kRequired).find("mapping"), std::string::npos);
  EXPECT_NE(error_of("/nonexistent/x.yaml", kRequired).find("/nonexistent/x.yaml"), std::string::npos);
}


TEST(Config, DuplicateKeysAreRefusedWithBothLines) {
  const std::string p = write_yaml("model: m\nbeta: 0.1\ntrain_file: t\nbeta: 0.5\n");
  const std::string e = error_of(p, {"out_dir=o"});
  EXPECT_NE(e.find(p + ":4"), std::string::npos) << e;
  EXPECT_NE(e.find("key 'beta' is given twice (first at line 2)"), std::string::npos) << e;
  // The same key twice among the overrides is not an error: the last one wins, as documented.
  EXPECT_EQ(load_train_config("", {"model=m", "train_file=t", "out_dir=o", "beta=0.2", "beta=0.3"}, RunKind::Dpo).beta,
            0.3);
}

TEST(Config, SecondYamlDocumentIsRefused) {
  const std::string p = write_yaml("model: m\ntrain_file: t\n---\nout_dir: o\n");
  const std::string e = error_of(p, {});
  EXPECT_NE(e.find(p + ":"), std::string::npos) << e;
  EXPECT_NE(e.find("second YAML document"), std::string::npos) << e;
  // An empty second document counts too: the file is not one mapping.
  EXPECT_NE(error_of(write_yaml("model: m\n---\n"), kRequired).find("second YAML document"), std::string::npos);
  // One document with an explicit start marker is fine.
  EXPECT_EQ(error_of(write_yaml("---\nmodel: m\ntrain_file: t\nout_dir: o\n"), {}), "");
}

// Streams on which yaml-cpp 0.7's LoadAll never returns (found by tests/fuzz/fuzz_yaml_config): a clear error with
// the line, in bounded time (ctest's timeout would catch a hang).
TEST(Config, StreamsThatStallTheParserAreRefused) {
  for (const char* text : {", ", ",a", ", a: o,\n", "model: m\n, "}) {
    SCOPED_TRACE(text);
    const std::string p = write_yaml(text);
    const std::string e = error_of(p, {});
    EXPECT_NE(e.find(p + ":"), std::string::npos) << e;
    EXPECT_NE(e.find("not valid YAML"), std::string::npos) << e;
  }
}

// A mapping or a list as a key (found by the config fuzz target) is an input error at its line, not yaml-cpp's
// conversion exception.
TEST(Config, NonScalarKeysAreRefused) {
  for (const char* text : {"{a: 1}: 2\n", "model: m\n[x, y]: 3\n", "? {model: m}\n: 1\n"}) {
    SCOPED_TRACE(text);
    const std::string p = write_yaml(text);
    const std::string e = error_of(p, {});
    EXPECT_NE(e.find(p + ":"), std::string::npos) << e;
    EXPECT_NE(e.find("a key must be a plain name"), std::string::npos) << e;
  }
}

TEST(Config, DirectoryAsConfigIsAnInputError) {
  const std::string dir = (fs::path(::testing::TempDir()) / "cfg_a_directory").string();
  fs::create_directories(dir);
  const std::string e = error_of(dir, kRequired);
  EXPECT_NE(e.find(dir + ": cannot open config file (a directory"), std::string::npos) << e;
}

TEST(Config, ValidationErrorsNameFileLineOfTheKey) {
  const std::string p = write_yaml("model: m\ntrain_file: t\nout_dir: o\nlearning_rate: 1e39\n");
  const std::string e = error_of(p, {});
  EXPECT_NE(e.find(p + ":4: key 'learning_rate'"), std::string::npos) << e;
  EXPECT_NE(error_of("", {"model=m", "train_file=t", "out_dir=o", "num_threads=100000"})
                .find("override 'num_threads=100000': key 'num_threads'"),
            std::string::npos);
}

// Each bounded key, with the last accepted and the first refused value on each side of its range. Doubles step
// by the smallest representable amount (nextafter; a subnormal such as 5e-324 is not read as a number, so the
// open lower bounds at 0 are checked with 1e-300), integers by one.
TEST(Config, EveryNumericBoundIsTestedOnBothSides) {
  auto err = [](const std::string& kv, RunKind kind = RunKind::Dpo) {
    std::vector<std::string> ov = kRequired;
    ov.push_back(kv);
    return error_of("", ov, kind);
  };
  auto dbl = [](double v) {
    std::ostringstream s;
    s.precision(17);
    s << v;
    return s.str();
  };
  struct RealCase {
    const char* key;
    double ok_lo, bad_lo, ok_hi, bad_hi;  // bad_lo / bad_hi NaN = no such side
  };
  const double none = std::nan("");
  const RealCase reals[] = {
      {"learning_rate", 1e-300, 0.0, 1.0, std::nextafter(1.0, 2.0)},
      {"weight_decay", 0.0, -5e-324, 1.0, none},  // upper side: learning_rate * weight_decay (below)
      {"adam_beta1", 0.0, -5e-324, std::nextafter(1.0, 0.0), 1.0},
      {"adam_beta2", 0.0, -5e-324, std::nextafter(1.0, 0.0), 1.0},
      {"adam_epsilon", 1e-30, std::nextafter(1e-30, 0.0), 1.0, std::nextafter(1.0, 2.0)},
      {"max_grad_norm", 0.0, -5e-324, 1e30, std::nextafter(1e30, 1e31)},
      {"beta", 1e-300, 0.0, 1e6, std::nextafter(1e6, 1e7)},
      {"label_smoothing", 0.0, -5e-324, std::nextafter(0.5, 0.0), 0.5},
      {"odpo_alpha", 0.0, -5e-324, 1e6, std::nextafter(1e6, 1e7)},
      {"rpo_alpha", 0.0, -5e-324, 1e6, std::nextafter(1e6, 1e7)},
      {"loss_weights", 0.0, -5e-324, 1e6, std::nextafter(1e6, 1e7)},
  };
  for (const auto& c : reals) {
    const std::string k = c.key;
    EXPECT_EQ(err(k + "=" + dbl(c.ok_lo)), "") << k << " = " << dbl(c.ok_lo);
    EXPECT_EQ(err(k + "=" + dbl(c.ok_hi)), "") << k << " = " << dbl(c.ok_hi);
    if (!std::isnan(c.bad_lo)) EXPECT_NE(err(k + "=" + dbl(c.bad_lo)).find("key '" + k + "'"), std::string::npos) << k;
    if (!std::isnan(c.bad_hi)) EXPECT_NE(err(k + "=" + dbl(c.bad_hi)).find("key '" + k + "'"), std::string::npos) << k;
    for (const char* nf : {".nan", ".inf", "-.inf"})
      EXPECT_NE(err(k + "=" + nf).find("key '" + k + "'"), std::string::npos) << k << " = " << nf;
  }
  EXPECT_NE(err("learning_rate=1e39").find("key 'learning_rate'"), std::string::npos);
  // learning_rate * weight_decay <= 1: each step scales the weights by (1 - lr * wd).
  EXPECT_EQ(err("weight_decay=1000000"), "");  // with the default learning_rate 1e-6: product 1
  EXPECT_NE(err("weight_decay=1000001").find("key 'weight_decay'"), std::string::npos);

  struct IntCase {
    const char* key;
    int64_t lo, hi;
  };
  const IntCase ints[] = {
      {"num_threads", 0, kMaxThreads},
      {"logits_chunk_rows", 1, kMaxCount},
      {"per_device_train_batch_size", 1, kMaxBatch},
      {"per_device_eval_batch_size", 1, kMaxBatch},
      {"gradient_accumulation_steps", 1, kMaxBatch},
      {"num_train_epochs", 1, kMaxCount},
      {"max_steps", 1, kMaxCount},
      {"warmup_steps", 0, kMaxCount},
      {"logging_steps", 1, kMaxCount},
      {"eval_steps", 0, kMaxCount},
      {"save_steps", 0, kMaxCount},
      {"save_total_limit", 0, kMaxCount},
  };
  for (const auto& c : ints) {
    const std::string k = c.key;
    // warmup_steps > 0 needs a schedule with a warmup (lr_scheduler_type constant has none).
    auto e = [&](int64_t v) {
      std::vector<std::string> ov = kRequired;
      if (k == "warmup_steps") ov.push_back("lr_scheduler_type=linear");
      ov.push_back(k + "=" + std::to_string(v));
      return error_of("", ov);
    };
    EXPECT_EQ(e(c.lo), "") << k;
    EXPECT_EQ(e(c.hi), "") << k;
    if (k != "max_steps")  // max_steps: -1 means "from epochs", 0 is refused (below)
      EXPECT_NE(e(c.lo - 1).find("key '" + k + "'"), std::string::npos) << k;
    EXPECT_NE(e(c.hi + 1).find("key '" + k + "'"), std::string::npos) << k;
  }
  EXPECT_EQ(err("max_steps=-1"), "");
  EXPECT_NE(err("max_steps=0").find("key 'max_steps'"), std::string::npos);
  EXPECT_NE(err("max_steps=-2").find("key 'max_steps'"), std::string::npos);
  EXPECT_NE(err("num_threads=100000").find("key 'num_threads'"), std::string::npos);
  // Lengths: max_prompt_length < max_length <= kMaxBatch.
  const std::string mb = std::to_string(kMaxBatch);
  EXPECT_EQ(error_of("", {"model=m", "train_file=t", "out_dir=o", "max_length=" + mb}, RunKind::Dpo), "");
  EXPECT_NE(error_of("", {"model=m", "train_file=t", "out_dir=o", "max_length=" + std::to_string(kMaxBatch + 1)},
                     RunKind::Dpo)
                .find("key 'max_length'"),
            std::string::npos);
  EXPECT_NE(err("max_length=0").find("key 'max_length'"), std::string::npos);
  // max_prompt_length (truncation: legacy, chosen by setting it): 0 = unset (then trl1), 1 .. max_length - 1.
  EXPECT_EQ(err("max_prompt_length=1"), "");
  EXPECT_EQ(err("max_prompt_length=0"), "");
  EXPECT_NE(err("max_prompt_length=-1").find("key 'max_prompt_length'"), std::string::npos);
  EXPECT_EQ(err("max_prompt_length=511"), "");
  EXPECT_NE(err("max_prompt_length=512").find("key 'max_prompt_length'"), std::string::npos);
  // seed: any 64-bit integer is valid.
  EXPECT_EQ(err("seed=-9223372036854775808"), "");
  EXPECT_EQ(err("seed=9223372036854775807"), "");
}

TEST(Config, LengthDefaultsFollowTheModel) {
  TrainConfig c = load_train_config("", kRequired, RunKind::Dpo);
  EXPECT_EQ(c.max_length, 512);
  std::vector<std::string> notes = fit_to_model(c, 256, "base", RunKind::Dpo);
  EXPECT_EQ(c.max_length, 256);
  EXPECT_EQ(c.max_prompt_length, 0);  // trl1 has no prompt budget
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("max_length: 256"), std::string::npos) << notes[0];
  // A model with room for the defaults changes nothing.
  TrainConfig big = load_train_config("", kRequired, RunKind::Dpo);
  EXPECT_TRUE(fit_to_model(big, 1024, "gpt2", RunKind::Dpo).empty());
  EXPECT_EQ(big.max_length, 512);
  // Given values are kept; too large is an error naming the key to set and the bound.
  std::vector<std::string> ov = kRequired;
  ov.push_back("max_length=300");
  TrainConfig g = load_train_config("", ov, RunKind::Dpo);
  try {
    fit_to_model(g, 256, "base", RunKind::Dpo);
    ADD_FAILURE() << "max_length 300 > n_positions 256 accepted";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("key 'max_length'"), std::string::npos) << m;
    EXPECT_NE(m.find("set max_length to at most 256"), std::string::npos) << m;
  }
}

TEST(Config, LegacyPromptBudgetFollowsTheModel) {
  std::vector<std::string> ov = kRequired;
  ov.push_back("truncation=legacy");
  TrainConfig c = load_train_config("", ov, RunKind::Dpo);
  EXPECT_EQ(c.max_prompt_length, 256);
  std::vector<std::string> notes = fit_to_model(c, 256, "base", RunKind::Dpo);
  EXPECT_EQ(c.max_length, 256);
  EXPECT_EQ(c.max_prompt_length, 128);  // the default 256 no longer fits below 256
  ASSERT_EQ(notes.size(), 2u);
  EXPECT_NE(notes[0].find("max_length: 256"), std::string::npos) << notes[0];
  EXPECT_NE(notes[1].find("max_prompt_length: 128"), std::string::npos) << notes[1];
  // A given max_length at or below the default prompt budget brings the prompt budget to half of it.
  ov.push_back("max_length=200");
  TrainConfig h = load_train_config("", ov, RunKind::Dpo);
  EXPECT_EQ(h.max_prompt_length, 100);
  EXPECT_TRUE(fit_to_model(h, 200, "m", RunKind::Dpo).empty());
  // A given max_prompt_length that does not fit is still an error.
  ov.push_back("max_prompt_length=200");
  EXPECT_NE(error_of("", ov).find("key 'max_prompt_length'"), std::string::npos);
  // max_prompt_length without truncation chooses legacy and says so in the run's notes.
  std::vector<std::string> mp = kRequired;
  mp.push_back("max_prompt_length=50");
  TrainConfig m = load_train_config("", mp, RunKind::Dpo);
  const auto n = fit_to_model(m, 1024, "gpt2", RunKind::Dpo);
  ASSERT_EQ(n.size(), 1u);
  EXPECT_NE(n[0].find("truncation: legacy (max_prompt_length is set"), std::string::npos) << n[0];
}

// ---- the dpo binary: input errors exit 2 naming the path, key or subcommand; nothing is left behind ----

const std::string kDpo = std::string(DPO_BINARY_DIR) + "/dpo";

struct Cli {
  int code = -1;
  std::string err;
};

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char ch : s) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return q + "'";
}

Cli dpo_cli(const std::string& args) {
  Cli r;
  if (!fs::exists(kDpo)) {
    ADD_FAILURE() << "the dpo binary is not built: " << kDpo;
    return r;
  }
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string err = (fs::path(::testing::TempDir()) / (std::string("cli_") + info->name() + ".err")).string();
  const std::string cmd = "OMP_NUM_THREADS=1 " + quote(kDpo) + " " + args + " >/dev/null 2>" + quote(err);
  const int st = std::system(cmd.c_str());
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  std::ifstream f(err);
  std::stringstream ss;
  ss << f.rdbuf();
  r.err = ss.str();
  return r;
}

// A fresh scratch directory per test.
std::string scratch() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path d = fs::path(::testing::TempDir()) / (std::string("cli_") + info->name());
  fs::remove_all(d);
  fs::create_directories(d);
  return d.string();
}

// A tiny model (n_positions 64) and a few preference pairs in `dir`.
void tiny_inputs(const std::string& dir) {
  const Cli r = dpo_cli("init --out " + quote(dir + "/base") +
                        " --n-layer 1 --n-head 2 --n-embd 16 --vocab-size 257 --n-positions 64");
  ASSERT_EQ(r.code, 0) << r.err;
  std::ofstream f(dir + "/pairs.jsonl");
  for (int i = 0; i < 4; ++i)
    f << "{\"prompt\": \"q" << i << "\", \"chosen\": \"good\", \"rejected\": \"bad\"}\n";
}

TEST(ConfigCli, DirectoryAsConfigExitsTwo) {
  const std::string d = scratch();
  const Cli r = dpo_cli("train --config " + quote(d));
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find(d + ": cannot open config file (a directory"), std::string::npos) << r.err;
}

TEST(ConfigCli, SymlinkLoopAsModelExitsTwo) {
  const std::string d = scratch();
  tiny_inputs(d);
  fs::create_symlink(d + "/loop_a", d + "/loop_b");
  fs::create_symlink(d + "/loop_b", d + "/loop_a");
  const std::string out = d + "/run";
  for (const std::string& args :
       {"train model=" + quote(d + "/loop_a") + " train_file=" + quote(d + "/pairs.jsonl") + " out_dir=" + quote(out),
        "info " + quote(d + "/loop_a"), "sample " + quote(d + "/loop_a") + " -p hi",
        "eval " + quote(d + "/loop_a") + " model=" + quote(d + "/base") + " train_file=" +
            quote(d + "/pairs.jsonl")}) {
    const Cli r = dpo_cli(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
    EXPECT_NE(r.err.find(d + "/loop_a"), std::string::npos) << args << "\n" << r.err;
    EXPECT_EQ(r.err.find("internal error"), std::string::npos) << r.err;
  }
  EXPECT_FALSE(fs::exists(out));
}

TEST(ConfigCli, InitOutOnAnExistingFileExitsTwo) {
  const std::string d = scratch();
  std::ofstream(d + "/file") << "x";
  const Cli r = dpo_cli("init --out " + quote(d + "/file") + " --n-layer 1 --n-head 1 --n-embd 8");
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("--out " + d + "/file: exists and is not a directory"), std::string::npos) << r.err;
}

TEST(ConfigCli, ImpossibleModelSizeExitsTwo) {
  const std::string d = scratch();
  // 2^40 parameters is the limit: 1000 layers of width 100000 are 1.2e14 parameters; n_embd * n_embd alone
  // overflows int64 at 4e9.
  for (const std::string& size :
       {"--n-layer 1000 --n-head 1 --n-embd 100000", "--n-layer 2 --n-head 1 --n-embd 4000000000"}) {
    const Cli r = dpo_cli("init --out " + quote(d + "/m") + " " + size);
    EXPECT_EQ(r.code, 2) << size << "\n" << r.err;
    EXPECT_NE(r.err.find("parameters; at most 2^40"), std::string::npos) << r.err;
  }
  EXPECT_FALSE(fs::exists(d + "/m"));
}

TEST(ConfigCli, UnknownSubcommandIsNamed) {
  const Cli r = dpo_cli("trian --config x.yaml");
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("unknown subcommand 'trian'; known: "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("train"), std::string::npos) << r.err;
}

TEST(ConfigCli, ThreadFlagsHaveTheKeysBound) {
  const std::string d = scratch();
  for (const std::string& args :
       {std::string("bench --threads 100000 --steps 1"), "demo --out " + quote(d + "/x") + " --threads 1025"}) {
    const Cli r = dpo_cli(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
    EXPECT_NE(r.err.find("--threads"), std::string::npos) << args << "\n" << r.err;
  }
}

TEST(ConfigCli, FailedValidationLeavesNoOutDir) {
  const std::string d = scratch();
  tiny_inputs(d);
  const std::string out = d + "/run";
  // ref_cache_dir inside the scratch directory: a case that wrongly runs must not write to the user's cache.
  const std::string base = "model=" + quote(d + "/base") + " out_dir=" + quote(out) + " ref_cache_dir=" +
                           quote(d + "/cache") + " ";
  std::ofstream(d + "/dup.jsonl") << "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\", \"chosen\": \"d\"}\n";
  std::ofstream(d + "/two_docs.yaml") << "beta: 0.1\n---\nbeta: 0.2\n";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"train " + base + "train_file=" + quote(d + "/missing.jsonl"), d + "/missing.jsonl"},
      {"train " + base + "train_file=" + quote(d + "/dup.jsonl"), d + "/dup.jsonl:1: duplicate key 'chosen'"},
      {"train " + base + "train_file=" + quote(d + "/pairs.jsonl") + " eval_file=" + quote(d + "/dup.jsonl"),
       d + "/dup.jsonl:1"},
      {"train --config " + quote(d + "/two_docs.yaml") + " " + base + "train_file=" + quote(d + "/pairs.jsonl"),
       d + "/two_docs.yaml:"},
      {"train " + base + "train_file=" + quote(d + "/pairs.jsonl") + " max_length=65", "set max_length to at most 64"},
      {"train " + base + "train_file=" + quote(d + "/pairs.jsonl") + " num_threads=100000", "key 'num_threads'"},
      {"train " + base + "train_file=" + quote(d + "/pairs.jsonl") + " learning_rate=1e39", "key 'learning_rate'"},
      {"train " + base + "train_file=" + quote(d + "/pairs.jsonl") + " odpo_alpha=1", d + "/pairs.jsonl:1: ODPO"},
      {"train " + base + "train_file=" + quote(d + "/pairs.jsonl") + " ref_model=" + quote(d + "/nope"),
       "key 'ref_model': " + d + "/nope"},
      {"sft " + base + "train_file=" + quote(d + "/pairs.jsonl"), d + "/pairs.jsonl:1"},  // not SFT records
  };
  // An out_dir that cannot be created is refused before any work, naming the key.
  std::ofstream(d + "/a_file") << "x";
  for (const std::string& bad_out : {d + "/a_file", d + "/a_file/run"}) {
    const Cli r = dpo_cli("train model=" + quote(d + "/base") + " train_file=" + quote(d + "/pairs.jsonl") +
                          " out_dir=" + quote(bad_out) + " ref_cache_dir=" + quote(d + "/cache"));
    EXPECT_EQ(r.code, 2) << bad_out << "\n" << r.err;
    EXPECT_NE(r.err.find("key 'out_dir': " + bad_out), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find("reference log-probs"), std::string::npos) << "refused only after the work: " << r.err;
  }
  for (const auto& [args, expect] : cases) {
    const Cli r = dpo_cli(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
    EXPECT_NE(r.err.find(expect), std::string::npos) << args << "\n" << r.err;
    EXPECT_FALSE(fs::exists(out)) << args << " left " << out;
  }
}

TEST(ConfigCli, MaxLengthFollowsTheModelAndSaysSo) {
  const std::string d = scratch();
  tiny_inputs(d);
  const std::string out = d + "/run";
  const Cli r = dpo_cli("train --plain model=" + quote(d + "/base") + " train_file=" + quote(d + "/pairs.jsonl") +
                        " out_dir=" + quote(out) + " max_steps=1 ref_cache_dir=" + quote(d + "/cache"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("max_length: 64 (the n_positions of " + d + "/base"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("max_prompt_length"), std::string::npos) << r.err;  // trl1: no prompt budget
  std::ifstream f(out + "/config.yaml");
  std::stringstream y;
  y << f.rdbuf();
  EXPECT_NE(y.str().find("max_length: 64\n"), std::string::npos) << y.str();
  EXPECT_NE(y.str().find("truncation: trl1\n"), std::string::npos) << y.str();
  EXPECT_NE(y.str().find("truncation_mode: keep_start\n"), std::string::npos) << y.str();
}

TEST(ConfigCli, SampleSaysWhenMaxNewTokensIsCapped) {
  const std::string d = scratch();
  tiny_inputs(d);
  const std::string m = quote(d + "/base");
  const Cli capped = dpo_cli("sample " + m + " -p abcd --max-new-tokens 61 --temperature 0");
  EXPECT_EQ(capped.code, 0) << capped.err;
  EXPECT_NE(capped.err.find("--max-new-tokens 61 is capped by the 64-token context"), std::string::npos)
      << capped.err;
  EXPECT_NE(capped.err.find("at most 60 new tokens"), std::string::npos) << capped.err;
  const Cli fits = dpo_cli("sample " + m + " -p abcd --max-new-tokens 60 --temperature 0");
  EXPECT_EQ(fits.code, 0) << fits.err;
  EXPECT_EQ(fits.err.find("capped"), std::string::npos) << fits.err;
}

}  // namespace
}  // namespace dpo
