// YAML config + key=value overrides: every error names the key and where it came from.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

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
  EXPECT_NE(with({"loss_weights=[1,2]"}).find("key 'loss_weights'"), std::string::npos);
  EXPECT_NE(with({"max_steps=0"}).find("key 'max_steps'"), std::string::npos);
  EXPECT_NE(with({"device=tpu"}).find("key 'device'"), std::string::npos);
  EXPECT_NE(with({"per_device_train_batch_size=0"}).find("key 'per_device_train_batch_size'"), std::string::npos);
  EXPECT_EQ(with({"beta=0.01"}), "");
}

TEST(Config, RequiredKeys) {
  EXPECT_NE(error_of("", {"train_file=t", "out_dir=o"}).find("key 'model'"), std::string::npos);
  EXPECT_NE(error_of("", {"model=m", "out_dir=o"}).find("key 'train_file'"), std::string::npos);
  EXPECT_NE(error_of("", {"model=m", "train_file=t"}).find("key 'out_dir'"), std::string::npos);
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

}  // namespace
}  // namespace dpo
