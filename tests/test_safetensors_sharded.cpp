// Sharded safetensors (runtime/safetensors.h: SafetensorsDir, save_safetensors_dir, plan_shards,
// parse_shard_size) and GPT-2 and Llama-family checkpoints saved and loaded in shards (model/checkpoint.h).
//
// Expected shard plans come from the rule of huggingface_hub's split_state_dict_into_shards_factory (the example
// in its docstring, worked by hand), not from our output. Reads are compared byte for byte with the tensors
// written and with the same tensors read from one file. Malformed indexes are written by hand, one defect each.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "model/checkpoint.h"
#include "runtime/backend.h"
#include "model/hf_llama.h"
#include "runtime/safetensors.h"
#include "test_util.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Named = std::vector<std::pair<std::string, Tensor>>;

const std::string kFixtureDir = std::string(DPO_FIXTURE_DIR) + "/gpt2_tiny";

// Passes when `fn` throws dpo::InputError whose message holds every one of `parts`.
::testing::AssertionResult input_error_with(const std::function<void()>& fn,
                                            std::initializer_list<std::string> parts) {
  try {
    fn();
  } catch (const InputError& e) {
    const std::string m = e.what();
    for (const auto& p : parts)
      if (m.find(p) == std::string::npos)
        return ::testing::AssertionFailure() << "message lacks '" << p << "': " << m;
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw another exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}
#define EXPECT_INPUT_ERROR(stmt, ...) EXPECT_TRUE(input_error_with([&] { stmt; }, {__VA_ARGS__}))

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  ASSERT_TRUE(f.good()) << path;
}

std::string bytes_of(const Tensor& t) {
  return std::string(static_cast<const char*>(t.raw()), static_cast<size_t>(t.nbytes()));
}

// Seeded random tensors of mixed dtypes and odd sizes (no size a multiple of 8 bytes' worth of elements).
Named random_tensors(uint64_t seed, const std::vector<std::pair<std::string, Shape>>& specs) {
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<int> byte(0, 255);
  const DType dtypes[] = {DType::F32, DType::BF16, DType::F64, DType::I64, DType::F16, DType::I32};
  Named out;
  size_t k = 0;
  for (const auto& [name, shape] : specs) {
    Tensor t = Tensor::host(shape, dtypes[k++ % 6]);
    auto* p = static_cast<unsigned char*>(t.raw());
    for (int64_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<unsigned char>(byte(g));
    out.emplace_back(name, t);
  }
  return out;
}

std::vector<std::string> dir_names(const std::string& dir) {
  std::vector<std::string> n;
  for (const auto& e : fs::directory_iterator(dir)) n.push_back(e.path().filename().string());
  std::sort(n.begin(), n.end());
  return n;
}

json read_json(const std::string& path) {
  std::ifstream f(path);
  return json::parse(f);
}

// Every tensor of `want` reads back byte for byte with its dtype and shape, and nothing else is listed.
void expect_holds(const SafetensorsDir& d, const Named& want) {
  ASSERT_EQ(d.entries().size(), want.size());
  for (const auto& [name, t] : want) {
    const SafetensorsEntry* e = d.find(name);
    ASSERT_NE(e, nullptr) << name;
    EXPECT_EQ(e->dtype, t.dtype()) << name;
    EXPECT_EQ(e->shape, t.shape()) << name;
    EXPECT_TRUE(bytes_of(d.read(name)) == bytes_of(t)) << name;
  }
  for (size_t i = 1; i < d.entries().size(); ++i) EXPECT_LT(d.entries()[i - 1].name, d.entries()[i].name);
}

// ---------------------------------------------------------------------------------------------------------------
// The plan and the size syntax
// ---------------------------------------------------------------------------------------------------------------

TEST(PlanShards, HubDocstringExample) {
  // huggingface_hub's docstring: limit 10, sizes [6, 6, 2, 6, 2, 2] -> [6], [6+2], [6+2+2] (greedy, in order).
  const auto plan = plan_shards({6, 6, 2, 6, 2, 2}, 10);
  const std::vector<std::vector<size_t>> want = {{0}, {1, 2}, {3, 4, 5}};
  EXPECT_EQ(plan, want);
}

TEST(PlanShards, OversizedTensorGetsItsOwnShardWhereItIsMet) {
  // 12 > 10: its own shard, appended at once while [3] stays open; then 3 + 4 fit, 5 does not.
  const auto plan = plan_shards({3, 12, 4, 5}, 10);
  const std::vector<std::vector<size_t>> want = {{1}, {0, 2}, {3}};
  EXPECT_EQ(plan, want);
  // Exactly the budget fits (HF: "> max_shard_size" starts a new shard).
  EXPECT_EQ(plan_shards({5, 5, 1}, 10), (std::vector<std::vector<size_t>>{{0, 1}, {2}}));
  EXPECT_EQ(plan_shards({}, 10).size(), 0u);
}

TEST(ParseShardSize, HfUnitsAndPlainBytes) {
  EXPECT_EQ(parse_shard_size("5GB", "k"), 5'000'000'000);
  EXPECT_EQ(parse_shard_size("500MB", "k"), 500'000'000);
  EXPECT_EQ(parse_shard_size("1.5gb", "k"), 1'500'000'000);
  EXPECT_EQ(parse_shard_size(" 10 KB ", "k"), 10'000);
  EXPECT_EQ(parse_shard_size("2TB", "k"), 2'000'000'000'000);
  EXPECT_EQ(parse_shard_size("123", "k"), 123);
  for (const char* bad : {"", "0", "0KB", "-1GB", "5XB", "GB", "abc", "5 G B", "1e3", "5GBs"})
    EXPECT_INPUT_ERROR(parse_shard_size(bad, "key 'max_shard_size'"), "key 'max_shard_size'", bad);
}

// ---------------------------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------------------------

const std::vector<std::pair<std::string, Shape>> kSpecs = {
    {"a.weight", {7, 13}}, {"b.bias", {13}},      {"c.weight", {5, 3, 11}},
    {"d.table", {29, 3}},  {"e.scalar", {}},      {"f.empty", {0, 4}}, {"g.long", {9}}};

// The shards a budget gives, from the plan of the tensors' sizes in order.
size_t shard_count(const Named& t, int64_t budget) {
  std::vector<int64_t> sizes;
  for (const auto& nt : t) sizes.push_back(nt.second.nbytes());
  return std::max<size_t>(1, plan_shards(sizes, budget).size());
}

// The smallest budget >= the largest tensor that gives exactly `n` shards (fails the test if none does).
int64_t budget_for(const Named& t, size_t n) {
  int64_t largest = 1, total = 0;
  for (const auto& nt : t) largest = std::max(largest, nt.second.nbytes()), total += nt.second.nbytes();
  for (int64_t b = largest; b <= total; ++b)
    if (shard_count(t, b) == n) return b;
  ADD_FAILURE() << "no budget gives " << n << " shards";
  return total;
}

TEST(SafetensorsSharded, RoundTripOneTwoThreeShardsMatchesTheSingleFile) {
  test::ScratchDir s("dpo_sharded_");
  const Named t = random_tensors(test::test_seed(), kSpecs);
  save_safetensors(s / "reference.safetensors", t, {{"format", "pt"}});
  const SafetensorsFile single(s / "reference.safetensors");
  for (size_t n : {1, 2, 3}) {
    SCOPED_TRACE("shards " + std::to_string(n));
    const std::string dir = s / ("n" + std::to_string(n));
    const int64_t budget = n == 1 ? kDefaultMaxShardBytes : budget_for(t, n);
    const std::vector<std::string> written = save_safetensors_dir(dir, t, {{"format", "pt"}}, budget);
    const SafetensorsDir d(dir);
    EXPECT_EQ(d.sharded(), n > 1);
    expect_holds(d, t);
    // Byte-identical to the same tensors read from the one file, entry for entry.
    for (const auto& e : single.entries()) {
      ASSERT_NE(d.find(e.name), nullptr);
      EXPECT_TRUE(bytes_of(d.read(e.name)) == bytes_of(single.read(e.name))) << e.name;
      EXPECT_TRUE(bytes_of(d.read_as(e.name, e.dtype)) == bytes_of(single.read_as(e.name, e.dtype))) << e.name;
    }
    std::vector<std::string> want_files;
    if (n == 1) {
      want_files = {kSafetensorsSingleName};
    } else {
      for (size_t k = 1; k <= n; ++k) {
        char name[64];
        std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", k, n);
        want_files.push_back(name);
      }
      want_files.push_back(kSafetensorsIndexName);
      EXPECT_EQ(d.files().size(), n);
      // The index as HF writes it: total_size = the tensors' data bytes; every tensor mapped to the file holding it.
      const json idx = read_json(dir + "/" + kSafetensorsIndexName);
      int64_t total = 0;
      for (const auto& nt : t) total += nt.second.nbytes();
      EXPECT_EQ(idx["metadata"]["total_size"].get<int64_t>(), total);
      ASSERT_EQ(idx["weight_map"].size(), t.size());
      for (const auto& nt : t) {
        const std::string shard = idx["weight_map"][nt.first].get<std::string>();
        EXPECT_EQ(d.file_of(nt.first), dir + "/" + shard);
        const SafetensorsFile f(dir + "/" + shard);
        EXPECT_NE(f.find(nt.first), nullptr);
        EXPECT_EQ(f.metadata().at("format"), "pt");
        int64_t shard_bytes = 0;
        for (const auto& e : f.entries()) shard_bytes += e.end - e.begin;
        if (f.entries().size() > 1) EXPECT_LE(shard_bytes, budget) << shard;  // only a lone tensor may exceed it
      }
    }
    EXPECT_EQ(written, want_files);
    EXPECT_EQ(dir_names(dir), [&] {
      auto w = want_files;
      std::sort(w.begin(), w.end());
      return w;
    }());  // no temporary file left
    EXPECT_INPUT_ERROR(d.read("nope"), "nope");
  }
}

TEST(SafetensorsSharded, TensorsLargerThanTheBudgetGetTheirOwnShards) {
  test::ScratchDir s("dpo_sharded_");
  // Budget 100 bytes. dtypes cycle F32, BF16, F64, I64, F16: s1 20 B, big 120 B, s2 24 B, huge 2400 B, s3 14 B.
  const Named t = random_tensors(test::test_seed(), {{"s1", {5}}, {"big", {60}}, {"s2", {3}}, {"huge", {300}},
                                                     {"s3", {7}}});
  save_safetensors_dir(s.dir.string(), t, {}, 100);
  const SafetensorsDir d(s.dir.string());
  expect_holds(d, t);
  EXPECT_NE(d.file_of("big"), d.file_of("huge"));
  for (const char* big : {"big", "huge"}) {
    const SafetensorsFile f(d.file_of(big));
    ASSERT_EQ(f.entries().size(), 1u) << big;
  }
  // s1, s2 and s3 (58 B) fit together in 100 bytes, around the two that do not.
  EXPECT_EQ(d.file_of("s1"), d.file_of("s2"));
  EXPECT_EQ(d.file_of("s1"), d.file_of("s3"));
  EXPECT_EQ(d.files().size(), 3u);
}

TEST(SafetensorsSharded, ResavingReplacesTheEarlierSetAndRemovesWhatItLeft) {
  test::ScratchDir s("dpo_sharded_");
  const std::string dir = s.dir.string();
  const Named t1 = random_tensors(test::test_seed(), kSpecs);
  const Named t2 = random_tensors(test::test_seed() + 1, kSpecs);
  const Named t3 = random_tensors(test::test_seed() + 2, kSpecs);
  write_text(s / "unrelated.txt", "kept");
  // A single file first: a sharded save must remove it (it would win over the new index).
  save_safetensors_dir(dir, t1);
  save_safetensors_dir(dir, t2, {}, budget_for(t2, 3));
  expect_holds(SafetensorsDir(dir), t2);
  EXPECT_FALSE(fs::exists(s / kSafetensorsSingleName));
  // Three shards, then two: the third shard of the earlier save is removed.
  save_safetensors_dir(dir, t3, {}, budget_for(t3, 2));
  expect_holds(SafetensorsDir(dir), t3);
  EXPECT_EQ(dir_names(dir), (std::vector<std::string>{"model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors", kSafetensorsIndexName,
                                                       "unrelated.txt"}));
  // The same count again (the earlier shards' names are reused).
  save_safetensors_dir(dir, t1, {}, budget_for(t1, 2));
  expect_holds(SafetensorsDir(dir), t1);
  // Back to one file: index and shards go.
  save_safetensors_dir(dir, t2);
  expect_holds(SafetensorsDir(dir), t2);
  EXPECT_EQ(dir_names(dir), (std::vector<std::string>{kSafetensorsSingleName, "unrelated.txt"}));
}

TEST(SafetensorsSharded, SingleFileWinsOverAnIndexAsInTransformers) {
  test::ScratchDir s("dpo_sharded_");
  const Named t = random_tensors(test::test_seed(), kSpecs);
  save_safetensors(s / kSafetensorsSingleName, t);
  write_text(s / kSafetensorsIndexName, "{ not json");  // never read
  const SafetensorsDir d(s.dir.string());
  EXPECT_FALSE(d.sharded());
  EXPECT_EQ(d.path(), s / kSafetensorsSingleName);
  expect_holds(d, t);
}

TEST(SafetensorsSharded, OpenTakesAFileOrADirectory) {
  test::ScratchDir s("dpo_sharded_");
  const Named t = random_tensors(test::test_seed(), kSpecs);
  save_safetensors(s / "weights.safetensors", t);
  expect_holds(SafetensorsDir::open(s / "weights.safetensors"), t);
  save_safetensors_dir((s / "d"), t, {}, budget_for(t, 2));
  expect_holds(SafetensorsDir::open(s / "d"), t);
}

// ---------------------------------------------------------------------------------------------------------------
// Malformed directories: one defect each, every error naming the file
// ---------------------------------------------------------------------------------------------------------------

// Two shards a.safetensors {x, y} and b.safetensors {z}, and an index written from `index` (a JSON text).
struct TwoShards {
  test::ScratchDir s{"dpo_sharded_bad_"};
  Named a, b;
  TwoShards() {
    a = random_tensors(test::test_seed(), {{"x", {3, 5}}, {"y", {7}}});
    b = random_tensors(test::test_seed() + 1, {{"z", {11}}});
    save_safetensors(s / "a.safetensors", a);
    save_safetensors(s / "b.safetensors", b);
  }
  std::string dir() const { return s.dir.string(); }
  std::string index_path() const { return s / kSafetensorsIndexName; }
  void index(const std::string& text) { write_text(index_path(), text); }
  int64_t total() const { return a[0].second.nbytes() + a[1].second.nbytes() + b[0].second.nbytes(); }
};

const char* kGoodMap = R"({"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"})";

TEST(SafetensorsShardedBad, TheWellFormedBaseCaseLoads) {
  TwoShards d;
  d.index(std::string(R"({"metadata": {"total_size": )") + std::to_string(d.total()) + R"(}, "weight_map": )" +
          kGoodMap + "}");
  const SafetensorsDir r(d.dir());
  EXPECT_TRUE(r.sharded());
  Named all = d.a;
  all.push_back(d.b[0]);
  expect_holds(r, all);
  // A float total_size with an integral value (some writers) and no metadata at all are accepted too.
  d.index(std::string(R"({"metadata": {"total_size": )") + std::to_string(d.total()) + R"(.0}, "weight_map": )" +
          kGoodMap + "}");
  EXPECT_NO_THROW(SafetensorsDir{d.dir()});
  d.index(std::string(R"({"weight_map": )") + kGoodMap + "}");
  EXPECT_NO_THROW(SafetensorsDir{d.dir()});
}

TEST(SafetensorsShardedBad, NeitherFormPresent) {
  test::ScratchDir s("dpo_sharded_bad_");
  EXPECT_INPUT_ERROR(SafetensorsDir(s.dir.string()), s.dir.string(), kSafetensorsSingleName, kSafetensorsIndexName);
  EXPECT_INPUT_ERROR(SafetensorsDir(s / "absent"), s / "absent", "not a model directory");
}

TEST(SafetensorsShardedBad, IndexSyntaxAndShape) {
  TwoShards d;
  const std::string p = d.index_path();
  d.index("{\"weight_map\": {\"x\": ");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), p, "not valid JSON");
  d.index("[1, 2]");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), p, "not a JSON object");
  d.index(R"({"metadata": {}})");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), p, "weight_map");
  d.index(R"({"weight_map": ["a.safetensors"]})");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), p, "weight_map");
  d.index(R"({"weight_map": {}})");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), p, "names no tensors");
  d.index(R"({"weight_map": {"x": "a.safetensors", "y": 7, "z": "b.safetensors"}})");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), p, "weight_map['y']");
  d.index(R"({"metadata": [], "weight_map": )" + std::string(kGoodMap) + "}");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), p, "'metadata'");
  d.index(R"({"weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors",)"
          R"( "x": "b.safetensors"}})");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), p, "key 'x' appears twice");
}

TEST(SafetensorsShardedBad, ShardMissingOrOutsideTheDirectory) {
  TwoShards d;
  const std::string p = d.index_path();
  d.index(R"({"weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": "c.safetensors"}})");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), p, "'c.safetensors'", "does not exist");
  // A real file outside the directory, reached by ".." or an absolute path, is refused all the same.
  const std::string outside = (d.s.dir.parent_path() / "dpo_sharded_outside.safetensors").string();
  save_safetensors(outside, d.b);
  for (const std::string name : {std::string("../dpo_sharded_outside.safetensors"), outside,
                                 std::string("sub/../../dpo_sharded_outside.safetensors"), std::string("")}) {
    d.index(R"({"weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": )" + json(name).dump() + "}}");
    EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), p, "not a file inside the directory");
  }
  fs::remove(outside);
}

TEST(SafetensorsShardedBad, TensorAbsentFromItsShard) {
  TwoShards d;
  d.index(R"({"weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors",)"
          R"( "w": "b.safetensors"}})");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), d.index_path(), "'w'", "'b.safetensors'", "does not hold it");
}

TEST(SafetensorsShardedBad, TensorInTwoShards) {
  TwoShards d;
  // b.safetensors also holds an "x"; the index maps x to a.safetensors.
  save_safetensors(d.s / "b.safetensors", {d.b[0], {"x", d.a[0].second}});
  d.index(std::string(R"({"weight_map": )") + kGoodMap + "}");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), d.index_path(), "'x'", "two shards", "a.safetensors",
                     "b.safetensors");
}

TEST(SafetensorsShardedBad, ShardHoldsATensorTheIndexDoesNotName) {
  TwoShards d;
  d.index(R"({"weight_map": {"x": "a.safetensors", "z": "b.safetensors"}})");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), d.index_path(), "'y'", "does not name");
}

TEST(SafetensorsShardedBad, TotalSizeChecked) {
  TwoShards d;
  const std::string p = d.index_path();
  d.index(std::string(R"({"metadata": {"total_size": )") + std::to_string(d.total() + 1) + R"(}, "weight_map": )" +
          kGoodMap + "}");
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), p, "total_size", std::to_string(d.total()));
  for (const char* v : {"\"12\"", "-4", "1.5", "null"}) {
    d.index(std::string(R"({"metadata": {"total_size": )") + v + R"(}, "weight_map": )" + kGoodMap + "}");
    EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), p, "total_size");
  }
}

TEST(SafetensorsShardedBad, CorruptShardNamesTheShard) {
  TwoShards d;
  d.index(std::string(R"({"weight_map": )") + kGoodMap + "}");
  const std::string b = d.s / "b.safetensors";
  const std::string bytes = test::slurp(b);
  write_text(b, bytes.substr(0, bytes.size() - 3));
  EXPECT_INPUT_ERROR(SafetensorsDir(d.dir()), b, "truncated");
}

// ---------------------------------------------------------------------------------------------------------------
// GPT-2 checkpoints in shards
// ---------------------------------------------------------------------------------------------------------------

std::vector<float> master_of(const GPT2& m) {
  Tensor h = Tensor::host({m.params().numel()}, DType::F32);
  m.backend().copy_to_host(h, m.master_params());
  return std::vector<float>(h.data<float>(), h.data<float>() + h.numel());
}

TEST(GPT2Sharded, CheckpointSavedInThreeShardsLoadsBitwise) {
  test::ScratchDir s("dpo_sharded_gpt2_");
  auto be = make_cpu_backend(1);
  auto model = load_gpt2_checkpoint(*be, kFixtureDir, DType::F32);
  const std::vector<float> want = master_of(*model);
  // A budget that gives exactly three shards of the parameters in the order the saver writes them.
  Named sized;
  for (const auto& sp : model->specs()) sized.emplace_back(sp.name, Tensor::host(sp.shape, DType::F32));
  const int64_t budget = budget_for(sized, 3);
  const std::vector<std::string> written = save_gpt2_checkpoint(*model, s / "sharded", budget);
  EXPECT_EQ(written, (std::vector<std::string>{"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                               "model-00003-of-00003.safetensors", kSafetensorsIndexName,
                                               "config.json", kGenerationConfigFile}));
  EXPECT_FALSE(fs::exists(s / "sharded/model.safetensors"));
  save_gpt2_checkpoint(*model, s / "single");
  auto sharded = load_gpt2_checkpoint(*be, s / "sharded", DType::F32);
  auto single = load_gpt2_checkpoint(*be, s / "single", DType::F32);
  EXPECT_TRUE(test::bitwise_equal(master_of(*sharded), want));
  EXPECT_TRUE(test::bitwise_equal(master_of(*single), want));
  // Same tensors, same bytes, whichever form.
  const SafetensorsDir a(s / "sharded"), b(s / "single");
  ASSERT_EQ(a.entries().size(), b.entries().size());
  for (size_t i = 0; i < a.entries().size(); ++i) {
    EXPECT_EQ(a.entries()[i].name, b.entries()[i].name);
    EXPECT_TRUE(bytes_of(a.read(a.entries()[i].name)) == bytes_of(b.read(b.entries()[i].name)));
  }
}

TEST(GPT2Sharded, LoaderErrorsNameTheIndex) {
  test::ScratchDir s("dpo_sharded_gpt2_");
  auto be = make_cpu_backend(1);
  auto model = load_gpt2_checkpoint(*be, kFixtureDir, DType::F32);
  Named sized;
  for (const auto& sp : model->specs()) sized.emplace_back(sp.name, Tensor::host(sp.shape, DType::F32));
  save_gpt2_checkpoint(*model, s.dir.string(), budget_for(sized, 2));
  // Drop one tensor from the index and from its shard: the model misses it.
  json idx = read_json(s / kSafetensorsIndexName);
  const std::string shard = idx["weight_map"]["transformer.ln_f.bias"].get<std::string>();
  const SafetensorsFile f(s / shard);
  Named keep;
  for (const auto& e : f.entries())
    if (e.name != "transformer.ln_f.bias") keep.emplace_back(e.name, f.read(e.name));
  save_safetensors(s / shard, keep);
  idx["weight_map"].erase("transformer.ln_f.bias");
  idx["metadata"].erase("total_size");
  write_text(s / kSafetensorsIndexName, idx.dump());
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, s.dir.string(), DType::F32), s / kSafetensorsIndexName,
                     "missing tensor 'ln_f.bias'");
}

// ---------------------------------------------------------------------------------------------------------------
// Llama-family checkpoints in shards (the HF tensor names and layouts of model/hf_llama.h)
// ---------------------------------------------------------------------------------------------------------------

const std::string kLlamaRoot = std::string(DPO_FIXTURE_DIR) + "/llama_tiny";
const char* const kLlamaModels[] = {"llama_gqa", "llama3_tied", "qwen2_bias"};

TEST(LlamaSharded, CheckpointSavedInThreeShardsLoadsBitwise) {
  for (const char* name : kLlamaModels) {
    SCOPED_TRACE(name);
    test::ScratchDir s("dpo_sharded_llama_");
    auto be = make_cpu_backend(1);
    auto model = load_gpt2_checkpoint(*be, kLlamaRoot + "/" + name, DType::F32);
    ASSERT_EQ(model->config().arch, Arch::Llama);
    const std::vector<float> want = master_of(*model);
    // The budget from the tensors the saver writes, in its order (HF names: q/k/v and gate/up split).
    Tensor host = Tensor::host({model->params().numel()}, DType::F32);
    std::copy(want.begin(), want.end(), host.data<float>());
    const Named hf = hf_weight_tensors(*model, host);
    ASSERT_GT(hf.size(), model->specs().size());  // split pieces: not the model's own parameters
    const std::vector<std::string> written = save_gpt2_checkpoint(*model, s / "sharded", budget_for(hf, 3));
    EXPECT_EQ(written, (std::vector<std::string>{"model-00001-of-00003.safetensors",
                                                 "model-00002-of-00003.safetensors",
                                                 "model-00003-of-00003.safetensors", kSafetensorsIndexName,
                                                 "config.json"}));
    EXPECT_FALSE(fs::exists(s / "sharded/model.safetensors"));
    // The index maps HF's names (what transformers' from_pretrained looks up), not the model's.
    const json idx = read_json(s / (std::string("sharded/") + kSafetensorsIndexName));
    EXPECT_TRUE(idx["weight_map"].contains("model.layers.0.self_attn.q_proj.weight"));
    EXPECT_TRUE(idx["weight_map"].contains("model.norm.weight"));
    auto back = load_gpt2_checkpoint(*be, s / "sharded", DType::F32);
    EXPECT_EQ(back->config().model_type, model->config().model_type);
    EXPECT_TRUE(test::bitwise_equal(master_of(*back), want));
    // The same tensors and bytes as the single-file save.
    save_gpt2_checkpoint(*model, s / "single");
    const SafetensorsDir a(s / "sharded"), b(s / "single");
    EXPECT_FALSE(b.sharded());
    ASSERT_EQ(a.entries().size(), b.entries().size());
    for (size_t i = 0; i < a.entries().size(); ++i) {
      EXPECT_EQ(a.entries()[i].name, b.entries()[i].name);
      EXPECT_TRUE(bytes_of(a.read(a.entries()[i].name)) == bytes_of(b.read(b.entries()[i].name)));
    }
  }
}

// A sharded directory as HF ships Llama checkpoints, written here by hand from the fixture's single file (not by
// our writer): tensors dealt round-robin over three shards, so a shard holds names that are not neighbours, and an
// index whose weight_map is not in name order. It loads bitwise like the single file.
TEST(LlamaSharded, HfShardedDirectoryLoads) {
  for (const char* name : kLlamaModels) {
    SCOPED_TRACE(name);
    test::ScratchDir s("dpo_sharded_llama_hf_");
    const std::string src = kLlamaRoot + "/" + name;
    const SafetensorsFile single(src + "/model.safetensors");
    std::vector<Named> shards(3);
    json weight_map = json::object();
    int64_t total = 0;
    std::vector<SafetensorsEntry> order = single.entries();
    std::reverse(order.begin(), order.end());
    for (size_t i = 0; i < order.size(); ++i) {
      const std::string file = "model-0000" + std::to_string(i % 3 + 1) + "-of-00003.safetensors";
      shards[i % 3].emplace_back(order[i].name, single.read(order[i].name));
      weight_map[order[i].name] = file;
      total += order[i].end - order[i].begin;
    }
    for (size_t k = 0; k < 3; ++k)
      save_safetensors(s / ("model-0000" + std::to_string(k + 1) + "-of-00003.safetensors"), shards[k],
                       {{"format", "pt"}});
    write_text(s / kSafetensorsIndexName,
               json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2));
    fs::copy_file(src + "/config.json", s / "config.json");

    auto be = make_cpu_backend(1);
    auto want = load_gpt2_checkpoint(*be, src, DType::F32);
    auto got = load_gpt2_checkpoint(*be, s.dir.string(), DType::F32);
    EXPECT_TRUE(test::bitwise_equal(master_of(*got), master_of(*want)));
    // The weights alone (load_gpt2_weights on the directory), into a model made from the same config.
    GPT2 m(*be, want->config(), DType::F32);
    load_gpt2_weights(m, s.dir.string());
    EXPECT_TRUE(test::bitwise_equal(master_of(m), master_of(*want)));
  }
}

TEST(LlamaSharded, LoaderErrorsNameTheIndex) {
  test::ScratchDir s("dpo_sharded_llama_");
  auto be = make_cpu_backend(1);
  auto model = load_gpt2_checkpoint(*be, kLlamaRoot + "/llama_gqa", DType::F32);
  Tensor host = Tensor::host({model->params().numel()}, DType::F32);
  model->backend().copy_to_host(host, model->master_params());
  save_gpt2_checkpoint(*model, s.dir.string(), budget_for(hf_weight_tensors(*model, host), 2));
  json idx = read_json(s / kSafetensorsIndexName);
  const std::string gone = "model.layers.1.mlp.up_proj.weight";
  const std::string shard = idx["weight_map"][gone].get<std::string>();
  const SafetensorsFile f(s / shard);
  Named keep;
  for (const auto& e : f.entries())
    if (e.name != gone) keep.emplace_back(e.name, f.read(e.name));
  save_safetensors(s / shard, keep);
  idx["weight_map"].erase(gone);
  idx["metadata"].erase("total_size");
  write_text(s / kSafetensorsIndexName, idx.dump());
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, s.dir.string(), DType::F32), s / kSafetensorsIndexName,
                     "missing tensor '" + gone + "'");
}

}  // namespace
}  // namespace dpo
