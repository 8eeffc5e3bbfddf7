// Checkpoint and file-format I/O: the safetensors reader/writer (runtime/safetensors.h), GPT-2 config.json
// parsing and HF checkpoint loading/saving (model/checkpoint.h), and the exit codes of the `dpo` command line.
//
// Every malformed input must be rejected with dpo::InputError whose message names the file and, where there is
// one, the tensor or config field. Corrupted files are built at run time in a per-test temporary directory, most
// of them from a raw header string (so any header corruption is one line) or from the real HF-written fixture
// tests/fixtures/gpt2_tiny (so the loader is exercised on what transformers actually writes).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "model/checkpoint.h"
#include "runtime/safetensors.h"
#include "train/hash.h"
#include "train/trainer.h"
#include "test_util.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kFixtureDir = std::string(DPO_FIXTURE_DIR) + "/gpt2_tiny";
const std::string kFixtureModel = kFixtureDir + "/model.safetensors";
const std::string kFixtureConfig = kFixtureDir + "/config.json";
const std::string kDpoBinary = std::string(DPO_BINARY_DIR) + "/dpo";

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

// A fresh directory per test (suite + test name + pid, so parallel ctest runs never collide), removed afterwards.
class ScratchDir {
 public:
  ScratchDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::path(::testing::TempDir()) / ("dpo_ckpt_io_" + std::string(info->test_suite_name()) + "_" +
                                              info->name() + "_" + std::to_string(::getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  std::string str() const { return path_.string(); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << "cannot open " << path;
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  ASSERT_TRUE(f.good()) << "cannot create " << path;
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << "cannot write " << path;
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A raw safetensors file: 8-byte little-endian header length, the header text verbatim, then `data`.
std::string raw_safetensors(const std::string& header, const std::string& data = std::string()) {
  return le64(header.size()) + header + data;
}

std::string write_raw(const ScratchDir& dir, const std::string& header, const std::string& data = std::string(),
                      const std::string& name = "t.safetensors") {
  std::string p = dir.file(name);
  write_bytes(p, raw_safetensors(header, data));
  return p;
}

// Runs `fn`; succeeds iff it throws dpo::InputError whose message contains every string of `needles`.
::testing::AssertionResult input_error_contains(const std::function<void()>& fn,
                                                const std::vector<std::string>& needles) {
  try {
    fn();
  } catch (const InputError& e) {
    const std::string msg = e.what();
    for (const auto& n : needles)
      if (msg.find(n) == std::string::npos)
        return ::testing::AssertionFailure() << "InputError message does not contain \"" << n << "\": " << msg;
    return ::testing::AssertionSuccess() << msg;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-InputError exception: " << e.what();
  } catch (...) {
    return ::testing::AssertionFailure() << "threw a non-std exception";
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// The message of the InputError `fn` throws ("" if it throws nothing or something else; the caller's EXPECT_THROW
// reports that case).
std::string input_error_message(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const InputError& e) {
    return e.what();
  } catch (...) {
  }
  return "";
}

// EXPECT_THROW on the exact type, plus a check of the message.
#define EXPECT_INPUT_ERROR(stmt, ...)                                        \
  do {                                                                       \
    EXPECT_THROW(stmt, ::dpo::InputError);                                   \
    EXPECT_TRUE(input_error_contains([&] { stmt; }, {__VA_ARGS__}));         \
  } while (0)

void open_st(const std::string& p) { SafetensorsFile f(p); }

template <class T>
Tensor make_tensor(const Shape& shape, const std::vector<T>& v) {
  Tensor t = Tensor::host(shape, dtype_of<T>());
  EXPECT_EQ(static_cast<int64_t>(v.size()), t.numel());
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(T));
  return t;
}

Tensor make_u16(DType dtype, const std::vector<uint16_t>& v) {
  Tensor t = Tensor::host({static_cast<int64_t>(v.size())}, dtype);
  std::memcpy(t.raw(), v.data(), v.size() * 2);
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.raw(), b.raw(), static_cast<size_t>(a.nbytes())) == 0;
}

float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

uint32_t f32_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// Independent float -> bfloat16 -> float rounding (round to nearest, ties to even) for finite inputs.
float bf16_round(float f) {
  uint32_t b = f32_bits(f);
  uint32_t upper = b >> 16, lower = b & 0xffffu;
  if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u))) ++upper;
  return bits_to_f32(upper << 16);
}

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// All tensors of the real fixture, as stored (F32), in file order.
NamedTensors fixture_tensors() {
  SafetensorsFile f(kFixtureModel);
  NamedTensors out;
  for (const auto& e : f.entries()) out.emplace_back(e.name, f.read(e.name));
  return out;
}

Tensor* find_tensor(NamedTensors& ts, const std::string& name) {
  for (auto& [n, t] : ts)
    if (n == name) return &t;
  return nullptr;
}

// A checkpoint directory `dir` holding `tensors` (+ `metadata`) and `config_text` (default: the fixture's).
void write_checkpoint(const std::string& dir, const NamedTensors& tensors,
                      const std::string& config_text = read_bytes(kFixtureConfig)) {
  fs::create_directories(dir);
  save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  write_bytes((fs::path(dir) / "config.json").string(), config_text);
}

std::vector<float> host_params(const GPT2& m) {
  Tensor h = Tensor::host({m.params().numel()}, DType::F32);
  m.backend().copy_to_host(h, m.params());
  return std::vector<float>(h.data<float>(), h.data<float>() + h.numel());
}

std::vector<float> fixture_params_f32() {
  auto be = make_cpu_backend(1);
  auto m = load_gpt2_checkpoint(*be, kFixtureDir, DType::F32);
  return host_params(*m);
}

bool bit_identical(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::string config_text(const json& j) { return j.dump(2); }

json minimal_config() {
  return json{{"vocab_size", 17}, {"n_positions", 9}, {"n_embd", 8}, {"n_layer", 1}, {"n_head", 2}};
}

std::string write_config(const ScratchDir& dir, const json& j) {
  std::string p = dir.file("config.json");
  write_bytes(p, config_text(j));
  return p;
}

// The data-section start of a safetensors file (8 + header length).
uint64_t data_start_of(const std::string& path) {
  std::string b = read_bytes(path);
  EXPECT_GE(b.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(b[static_cast<size_t>(i)]);
  return 8 + n;
}

// ---------------------------------------------------------------------------------------------------------------
// Safetensors reader: malformed files
// ---------------------------------------------------------------------------------------------------------------

TEST(SafetensorsRead, EmptyFileIsTruncated) {
  ScratchDir d;
  std::string p = d.file("empty.safetensors");
  write_bytes(p, "");
  EXPECT_INPUT_ERROR(open_st(p), p, "truncated");
}

TEST(SafetensorsRead, FiveByteFileIsTruncated) {
  ScratchDir d;
  std::string p = d.file("five.safetensors");
  write_bytes(p, std::string("\x02\x00\x00\x00\x00", 5));
  EXPECT_INPUT_ERROR(open_st(p), p, "truncated");
}

TEST(SafetensorsRead, MissingFile) {
  ScratchDir d;
  std::string p = d.file("nope.safetensors");
  EXPECT_INPUT_ERROR(open_st(p), p);
}

TEST(SafetensorsRead, HeaderLongerThanFileIsTruncated) {
  ScratchDir d;
  std::string p = d.file("t.safetensors");
  // Claims a 1000-byte header; only 12 bytes follow.
  write_bytes(p, le64(1000) + "{\"a\": {}}   ");
  EXPECT_INPUT_ERROR(open_st(p), p, "truncated", "1000");
}

TEST(SafetensorsRead, HeaderLengthOverLimit) {
  ScratchDir d;
  std::string p = d.file("t.safetensors");
  write_bytes(p, le64(200'000'000) + "{}");
  EXPECT_INPUT_ERROR(open_st(p), p, "200000000", "limit");
  // Also far beyond int64: must not wrap around into a "valid" small or negative length.
  write_bytes(p, le64(0xffffffffffffff00ull) + "{}");
  EXPECT_INPUT_ERROR(open_st(p), p, "limit");
}

TEST(SafetensorsRead, RealFixtureTruncatedInDataSectionNamesACutTensor) {
  ScratchDir d;
  const std::string bytes = read_bytes(kFixtureModel);
  SafetensorsFile orig(kFixtureModel);
  const uint64_t start = data_start_of(kFixtureModel);
  const size_t cut = bytes.size() - 1000;  // inside the data section
  ASSERT_GT(cut, start);
  std::vector<std::string> cut_names, intact_names;
  for (const auto& e : orig.entries())
    (start + static_cast<uint64_t>(e.end) > cut ? cut_names : intact_names).push_back(e.name);
  ASSERT_FALSE(cut_names.empty());
  ASSERT_FALSE(intact_names.empty());

  std::string p = d.file("model.safetensors");
  write_bytes(p, bytes.substr(0, cut));
  EXPECT_THROW(open_st(p), InputError);
  const std::string msg = input_error_message([&] { open_st(p); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  bool names_cut = false;
  for (const auto& n : cut_names) names_cut |= msg.find("'" + n + "'") != std::string::npos;
  EXPECT_TRUE(names_cut) << "message names no tensor whose data is cut: " << msg;
  for (const auto& n : intact_names)
    EXPECT_EQ(msg.find("'" + n + "'"), std::string::npos) << "names intact tensor " << n << ": " << msg;
}

TEST(SafetensorsRead, HeaderNotJson) {
  ScratchDir d;
  std::string p = write_raw(d, "{\"a\": {\"dtype\": \"F32\",");
  EXPECT_INPUT_ERROR(open_st(p), p, "JSON");
  p = write_raw(d, "");  // zero-length header
  EXPECT_INPUT_ERROR(open_st(p), p, "JSON");
}

TEST(SafetensorsRead, HeaderJsonArray) {
  ScratchDir d;
  std::string p = write_raw(d, "[1, 2, 3]");
  EXPECT_INPUT_ERROR(open_st(p), p, "object");
}

TEST(SafetensorsRead, EntryNotAnObject) {
  ScratchDir d;
  std::string p = write_raw(d, R"({"w": [1, 2]})");
  EXPECT_INPUT_ERROR(open_st(p), p, "'w'");
}

TEST(SafetensorsRead, EntryMissingDtype) {
  ScratchDir d;
  std::string p = write_raw(d, R"({"wq": {"shape": [2], "data_offsets": [0, 8]}})", std::string(8, '\0'));
  EXPECT_INPUT_ERROR(open_st(p), p, "'wq'", "dtype");
}

TEST(SafetensorsRead, EntryMissingShape) {
  ScratchDir d;
  std::string p = write_raw(d, R"({"wk": {"dtype": "F32", "data_offsets": [0, 8]}})", std::string(8, '\0'));
  EXPECT_INPUT_ERROR(open_st(p), p, "'wk'", "shape");
}

TEST(SafetensorsRead, EntryMissingOrMalformedDataOffsets) {
  ScratchDir d;
  std::string p = write_raw(d, R"({"wv": {"dtype": "F32", "shape": [2]}})", std::string(8, '\0'));
  EXPECT_INPUT_ERROR(open_st(p), p, "'wv'", "data_offsets");
  p = write_raw(d, R"({"wv": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", std::string(8, '\0'));
  EXPECT_INPUT_ERROR(open_st(p), p, "'wv'", "data_offsets");
  p = write_raw(d, R"({"wv": {"dtype": "F32", "shape": [2], "data_offsets": [0, -8]}})", std::string(8, '\0'));
  EXPECT_INPUT_ERROR(open_st(p), p, "'wv'", "data_offsets");
}

TEST(SafetensorsRead, DataOffsetsBeginAfterEnd) {
  ScratchDir d;
  std::string p = write_raw(d, R"({"b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})",
                            std::string(8, '\0'));
  EXPECT_INPUT_ERROR(open_st(p), p, "'b'", "data_offsets", "begin");
}

TEST(SafetensorsRead, DataOffsetsPastEndOfFile) {
  ScratchDir d;
  std::string p = write_raw(d, R"({"tail": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
                            std::string(12, '\0'));
  EXPECT_INPUT_ERROR(open_st(p), p, "'tail'", "truncated");
}

// The size checks on both sides of their boundary: a tensor whose data_offsets end exactly at the end of the file
// loads (and reads back its bytes), one ending a byte past it is refused naming the file and the tensor.
TEST(SafetensorsRead, TensorEndingExactlyAtEndOfDataLoadsOneBytePastFails) {
  ScratchDir d;
  const std::string header =
      R"({"head": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
      R"( "tail": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}})";
  const float vals[5] = {1.5f, -2.0f, 3.25f, -0.125f, 1e-3f};
  std::string data(reinterpret_cast<const char*>(vals), sizeof(vals));  // exactly 20 bytes
  std::string p = write_raw(d, header, data);
  SafetensorsFile f(p);
  Tensor t = f.read("tail");
  ASSERT_EQ(t.numel(), 3);
  EXPECT_EQ(t.data<float>()[0], vals[2]);
  EXPECT_EQ(t.data<float>()[2], vals[4]);
  p = write_raw(d, header, data.substr(0, 19));  // the last tensor now ends one byte past the data
  EXPECT_INPUT_ERROR(open_st(p), p, "'tail'", "truncated", "20", "19 bytes");
}

// The header length: a header exactly filling the bytes after the length field loads; one byte more is refused.
TEST(SafetensorsRead, HeaderExactlyFittingLoadsOneByteOverFails) {
  ScratchDir d;
  const std::string header = R"({"e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})";
  std::string p = d.file("t.safetensors");
  write_bytes(p, le64(header.size()) + header);
  SafetensorsFile f(p);
  ASSERT_EQ(f.entries().size(), 1u);
  EXPECT_EQ(f.entries()[0].name, "e");
  write_bytes(p, le64(header.size() + 1) + header);
  EXPECT_INPUT_ERROR(open_st(p), p, "truncated", "header length " + std::to_string(header.size() + 1),
                     "only " + std::to_string(header.size()) + " bytes");
}

TEST(SafetensorsRead, ByteCountInconsistentWithShape) {
  ScratchDir d;
  // [3] F32 needs 12 bytes, the offsets give 8.
  std::string p = write_raw(d, R"({"emb": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})",
                            std::string(16, '\0'));
  EXPECT_INPUT_ERROR(open_st(p), p, "'emb'", "12");
  // Same element count but a 2-byte dtype.
  p = write_raw(d, R"({"emb": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 16]}})", std::string(16, '\0'));
  EXPECT_INPUT_ERROR(open_st(p), p, "'emb'", "BF16");
}

TEST(SafetensorsRead, NegativeOrNonIntegerShapeDim) {
  ScratchDir d;
  for (const char* dim : {"-1", "2.5", "\"2\"", "null", "1e3"}) {
    SCOPED_TRACE(dim);
    std::string p = write_raw(
        d, std::string(R"({"ln": {"dtype": "F32", "shape": [2, )") + dim + R"(], "data_offsets": [0, 8]}})",
        std::string(8, '\0'));
    EXPECT_INPUT_ERROR(open_st(p), p, "'ln'", "shape");
  }
}

TEST(SafetensorsRead, UnsupportedDtype) {
  ScratchDir d;
  for (const char* dt : {"F8_E4M3", "BOOL", "U8", "f32"}) {
    SCOPED_TRACE(dt);
    std::string p = write_raw(
        d, std::string(R"({"mask": {"dtype": ")") + dt + R"(", "shape": [4], "data_offsets": [0, 4]}})",
        std::string(4, '\0'));
    EXPECT_INPUT_ERROR(open_st(p), p, "'mask'", std::string("'") + dt + "'");
  }
}

TEST(SafetensorsRead, OverlappingTensors) {
  ScratchDir d;
  std::string p = write_raw(d,
                            R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                            std::string(12, '\0'));
  EXPECT_INPUT_ERROR(open_st(p), p, "'a'", "'b'", "overlap");
  // Identical ranges overlap too.
  p = write_raw(d,
                R"({"x": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]},
                    "y": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
                std::string(8, '\0'));
  EXPECT_INPUT_ERROR(open_st(p), p, "'x'", "'y'", "overlap");
}

// "big" [0,16) and "late" [8,12) overlap; an empty tensor sorted between them ([4,4)) must not hide that.
TEST(SafetensorsRead, OverlapNotHiddenByEmptyTensorBetween) {
  ScratchDir d;
  std::string p = write_raw(d,
                            R"({"big":   {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                "empty": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
                                "late":  {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
                            std::string(16, '\0'));
  EXPECT_INPUT_ERROR(open_st(p), p, "'big'", "'late'", "overlap");
}

TEST(SafetensorsRead, MetadataValueNotString) {
  ScratchDir d;
  std::string p = write_raw(d, R"({"__metadata__": {"format": "pt", "step": 12}})");
  EXPECT_INPUT_ERROR(open_st(p), p, "__metadata__", "step");
  p = write_raw(d, R"({"__metadata__": ["format", "pt"]})");
  EXPECT_INPUT_ERROR(open_st(p), p, "__metadata__");
}

TEST(SafetensorsRead, ReadMissingTensorNamesIt) {
  ScratchDir d;
  std::string p = d.file("ok.safetensors");
  save_safetensors(p, {{"present", make_tensor<float>({1}, {1.f})}});
  SafetensorsFile f(p);
  EXPECT_EQ(f.find("absent"), nullptr);
  EXPECT_INPUT_ERROR(f.read("absent"), p, "'absent'");
}

// ---------------------------------------------------------------------------------------------------------------
// Safetensors writer + reader round trips and conversions
// ---------------------------------------------------------------------------------------------------------------

TEST(SafetensorsWrite, RoundTripAllDtypesMetadataAlignmentNoTempFile) {
  ScratchDir d;
  std::mt19937_64 g(test::test_seed());
  auto f32 = test::randn<float>(g, 15);
  auto f64 = test::randn<double>(g, 7);
  std::vector<int32_t> i32 = {0, -1, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max(), 42};
  std::vector<int64_t> i64 = {std::numeric_limits<int64_t>::min(), -3, 0, 1ll << 40,
                              std::numeric_limits<int64_t>::max(), 9};
  NamedTensors ts = {
      {"z.f32", make_tensor<float>({3, 5}, f32)},    // names deliberately not in sorted order
      {"a.f64", make_tensor<double>({7}, f64)},      // 56 bytes
      {"m.i32", make_tensor<int32_t>({5}, i32)},     // 20 bytes: the next tensor starts unaligned to 8
      {"b.i64", make_tensor<int64_t>({2, 3}, i64)},
      {"s.scalar", make_tensor<float>({}, {3.5f})},  // rank 0
      {"e.empty", Tensor::host({2, 0}, DType::F32)},  // zero elements
  };
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "unicode \xc3\xa9 and \"quotes\""}};
  const std::string p = d.file("rt.safetensors");
  save_safetensors(p, ts, meta);

  SafetensorsFile f(p);
  EXPECT_EQ(f.metadata(), meta);
  ASSERT_EQ(f.entries().size(), ts.size());
  for (const auto& [name, t] : ts) {
    SCOPED_TRACE(name);
    const SafetensorsEntry* e = f.find(name);
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->dtype, t.dtype());
    EXPECT_EQ(e->shape, t.shape());
    EXPECT_EQ(e->end - e->begin, t.nbytes());
    Tensor back = f.read(name);
    EXPECT_TRUE(same_bytes(back, t));
  }
  EXPECT_EQ(data_start_of(p) % 8, 0u) << "data section must start 8-byte aligned";
  // Nothing but the final file in the directory: no leftover temporary.
  for (const auto& entry : fs::directory_iterator(d.str())) {
    EXPECT_EQ(entry.path().filename().string().find(".tmp."), std::string::npos) << entry.path();
    EXPECT_EQ(entry.path().string(), p);
  }
}

TEST(SafetensorsWrite, NoMetadataWritesNoMetadataKey) {
  ScratchDir d;
  const std::string p = d.file("nm.safetensors");
  save_safetensors(p, {{"w", make_tensor<float>({2}, {1.f, 2.f})}});
  SafetensorsFile f(p);
  EXPECT_TRUE(f.metadata().empty());
  const std::string b = read_bytes(p);
  const std::string header = b.substr(8, data_start_of(p) - 8);
  json h = json::parse(header);
  EXPECT_TRUE(h.is_object());
  EXPECT_FALSE(h.contains("__metadata__")) << header;
}

TEST(SafetensorsWrite, OverwriteReplacesExistingFile) {
  ScratchDir d;
  const std::string p = d.file("w.safetensors");
  save_safetensors(p, {{"old", make_tensor<double>({3}, {1, 2, 3})}});
  save_safetensors(p, {{"new", make_tensor<float>({1}, {7.f})}}, {{"format", "pt"}});
  SafetensorsFile f(p);
  ASSERT_EQ(f.entries().size(), 1u);
  EXPECT_EQ(f.entries()[0].name, "new");
  EXPECT_EQ(f.read("new").data<float>()[0], 7.f);
  size_t files = 0;
  for (const auto& entry : fs::directory_iterator(d.str())) {
    (void)entry;
    ++files;
  }
  EXPECT_EQ(files, 1u);
}

TEST(SafetensorsWrite, NonexistentDirectoryThrowsAndLeavesNoFile) {
  ScratchDir d;
  const std::string dir = d.file("does/not/exist");
  const std::string p = dir + "/x.safetensors";
  EXPECT_THROW(save_safetensors(p, {{"w", make_tensor<float>({1}, {1.f})}}), Error);
  EXPECT_FALSE(fs::exists(p));
  EXPECT_FALSE(fs::exists(dir));
  EXPECT_FALSE(fs::exists(p + ".tmp." + std::to_string(::getpid())));
  // write_file_atomic behaves the same way.
  EXPECT_THROW(write_file_atomic(dir + "/config.json", "{}"), Error);
  EXPECT_FALSE(fs::exists(dir));
}

TEST(SafetensorsConvert, F32ToF64IsExact) {
  ScratchDir d;
  std::mt19937_64 g(test::test_seed());
  auto v = test::randn<float>(g, 64, 10.0);
  v.push_back(std::numeric_limits<float>::denorm_min());
  v.push_back(-std::numeric_limits<float>::max());
  v.push_back(std::numeric_limits<float>::infinity());
  const std::string p = d.file("c.safetensors");
  save_safetensors(p, {{"w", make_tensor<float>({static_cast<int64_t>(v.size())}, v)}});
  SafetensorsFile f(p);
  Tensor t = f.read_as("w", DType::F64);
  ASSERT_EQ(t.dtype(), DType::F64);
  ASSERT_EQ(t.numel(), static_cast<int64_t>(v.size()));
  for (size_t i = 0; i < v.size(); ++i) EXPECT_EQ(t.data<double>()[i], static_cast<double>(v[i])) << i;
  // ... and back to F32 exactly.
  Tensor back = convert_host(t, DType::F32, "back");
  EXPECT_TRUE(same_bytes(back, make_tensor<float>({static_cast<int64_t>(v.size())}, v)));
}

TEST(SafetensorsConvert, BF16ToF32KnownBitPatterns) {
  ScratchDir d;
  const std::vector<uint16_t> bits = {0x3F80, 0xC000, 0x0000, 0x8000, 0x3E80, 0x4049, 0x7F80, 0xFF80, 0x0001};
  const std::vector<float> expect = {1.0f, -2.0f, 0.0f, -0.0f, 0.25f, 3.140625f,
                                     std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                                     bits_to_f32(0x00010000u)};
  const std::string p = d.file("bf16.safetensors");
  save_safetensors(p, {{"h", make_u16(DType::BF16, bits)}});
  SafetensorsFile f(p);
  EXPECT_EQ(f.find("h")->dtype, DType::BF16);
  Tensor t = f.read_as("h", DType::F32);
  ASSERT_EQ(t.dtype(), DType::F32);
  for (size_t i = 0; i < bits.size(); ++i)
    EXPECT_EQ(f32_bits(t.data<float>()[i]), f32_bits(expect[i])) << "bf16 0x" << std::hex << bits[i];
  // NaN stays NaN.
  save_safetensors(p, {{"n", make_u16(DType::BF16, {0x7FC0})}});
  EXPECT_TRUE(std::isnan(SafetensorsFile(p).read_as("n", DType::F32).data<float>()[0]));
}

TEST(SafetensorsConvert, F32ToBF16RoundsToNearestEven) {
  // 1 + 2^-8 is exactly halfway between bf16 1.0 (even) and 1 + 2^-7: ties to 1.0.
  // 1 + 3*2^-8 is halfway between 1 + 2^-7 (odd mantissa) and 1 + 2^-6: ties to 1 + 2^-6.
  // 1 + 2^-8 + 2^-20 is just above halfway: rounds up.
  const std::vector<float> in = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-8f + 0x1p-20f, -2.0f};
  const std::vector<uint16_t> want = {0x3F80, 0x3F82, 0x3F81, 0xC000};
  Tensor bf = convert_host(make_tensor<float>({4}, in), DType::BF16, "rne");
  ASSERT_EQ(bf.dtype(), DType::BF16);
  for (size_t i = 0; i < in.size(); ++i)
    EXPECT_EQ(static_cast<const uint16_t*>(bf.raw())[i], want[i]) << "input " << in[i];
}

TEST(SafetensorsConvert, F16ToF32KnownBitPatterns) {
  ScratchDir d;
  const std::vector<uint16_t> bits = {0x3C00, 0xC000, 0x0001, 0x7C00, 0xFC00, 0x0000,
                                      0x8000, 0x3555, 0x7BFF, 0x0400, 0x03FF, 0x8001};
  const std::vector<float> expect = {1.0f,
                                     -2.0f,
                                     0x1p-24f,  // smallest subnormal
                                     std::numeric_limits<float>::infinity(),
                                     -std::numeric_limits<float>::infinity(),
                                     0.0f,
                                     -0.0f,
                                     0.333251953125f,  // 0x3555
                                     65504.0f,         // largest finite half
                                     0x1p-14f,         // smallest normal
                                     1023 * 0x1p-24f,  // largest subnormal
                                     -0x1p-24f};
  const std::string p = d.file("f16.safetensors");
  save_safetensors(p, {{"h", make_u16(DType::F16, bits)}});
  SafetensorsFile f(p);
  Tensor t = f.read_as("h", DType::F32);
  ASSERT_EQ(t.dtype(), DType::F32);
  for (size_t i = 0; i < bits.size(); ++i)
    EXPECT_EQ(f32_bits(t.data<float>()[i]), f32_bits(expect[i]))
        << "f16 0x" << std::hex << bits[i] << " -> " << t.data<float>()[i];
  Tensor t64 = f.read_as("h", DType::F64);
  EXPECT_EQ(t64.data<double>()[2], std::ldexp(1.0, -24));
  save_safetensors(p, {{"n", make_u16(DType::F16, {0x7E00})}});
  EXPECT_TRUE(std::isnan(SafetensorsFile(p).read_as("n", DType::F32).data<float>()[0]));
}

TEST(SafetensorsConvert, IntegerConversionsAndRangeCheck) {
  ScratchDir d;
  const std::string p = d.file("ints.safetensors");
  save_safetensors(p, {{"ok", make_tensor<int64_t>({3}, {-5, 0, std::numeric_limits<int32_t>::max()})},
                       {"big", make_tensor<int64_t>({3}, {1, 2, 1ll << 31})},
                       {"small", make_tensor<int64_t>({1}, {-(1ll << 31) - 1})},
                       {"i32", make_tensor<int32_t>({2}, {-7, 8})}});
  SafetensorsFile f(p);
  Tensor ok = f.read_as("ok", DType::I32);
  ASSERT_EQ(ok.dtype(), DType::I32);
  EXPECT_EQ(ok.data<int32_t>()[0], -5);
  EXPECT_EQ(ok.data<int32_t>()[2], std::numeric_limits<int32_t>::max());
  Tensor wide = f.read_as("i32", DType::I64);
  EXPECT_EQ(wide.data<int64_t>()[0], -7);
  EXPECT_EQ(wide.data<int64_t>()[1], 8);
  EXPECT_INPUT_ERROR(f.read_as("big", DType::I32), p, "'big'", "2147483648");
  EXPECT_INPUT_ERROR(f.read_as("small", DType::I32), p, "'small'", "-2147483649");
}

TEST(SafetensorsConvert, IntegerToFloatRejectedNamingBothDtypes) {
  ScratchDir d;
  const std::string p = d.file("mix.safetensors");
  save_safetensors(p, {{"ids", make_tensor<int32_t>({2}, {1, 2})}, {"w", make_tensor<float>({1}, {1.f})}});
  SafetensorsFile f(p);
  EXPECT_INPUT_ERROR(f.read_as("ids", DType::F32), p, "'ids'", "I32", "F32");
  EXPECT_INPUT_ERROR(f.read_as("w", DType::I64), p, "'w'", "F32", "I64");
}

// ---------------------------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------------------------

TEST(GPT2ConfigJson, MissingRequiredFieldNamesFieldAndFile) {
  ScratchDir d;
  for (const char* field : {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head"}) {
    SCOPED_TRACE(field);
    json j = minimal_config();
    j.erase(field);
    std::string p = write_config(d, j);
    EXPECT_INPUT_ERROR(load_gpt2_config(p), p, std::string("'") + field + "'");
    j[field] = nullptr;  // null counts as missing
    p = write_config(d, j);
    EXPECT_INPUT_ERROR(load_gpt2_config(p), p, std::string("'") + field + "'");
  }
}

TEST(GPT2ConfigJson, WrongTypeRejected) {
  ScratchDir d;
  for (json bad : {json("2"), json(2.5), json(true), json::array({2}), json::object()}) {
    SCOPED_TRACE(bad.dump());
    json j = minimal_config();
    j["n_layer"] = bad;
    std::string p = write_config(d, j);
    EXPECT_INPUT_ERROR(load_gpt2_config(p), p, "n_layer");
  }
  json j = minimal_config();
  j["layer_norm_epsilon"] = "1e-5";
  std::string p = write_config(d, j);
  EXPECT_INPUT_ERROR(load_gpt2_config(p), p, "layer_norm_epsilon");
}

TEST(GPT2ConfigJson, ZeroOrNegativeSizesRejected) {
  ScratchDir d;
  for (const char* field : {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head"}) {
    for (int v : {0, -4}) {
      SCOPED_TRACE(std::string(field) + "=" + std::to_string(v));
      json j = minimal_config();
      j[field] = v;
      std::string p = write_config(d, j);
      EXPECT_INPUT_ERROR(load_gpt2_config(p), p, field);
    }
  }
  json j = minimal_config();
  j["layer_norm_epsilon"] = 0.0;
  std::string p = write_config(d, j);
  EXPECT_INPUT_ERROR(load_gpt2_config(p), p, "layer_norm_epsilon");
}

TEST(GPT2ConfigJson, EmbdNotDivisibleByHeads) {
  ScratchDir d;
  json j = minimal_config();
  j["n_embd"] = 10;
  j["n_head"] = 3;
  std::string p = write_config(d, j);
  EXPECT_INPUT_ERROR(load_gpt2_config(p), p, "n_embd", "10", "n_head", "3");
}

TEST(GPT2ConfigJson, OtherModelTypeRejected) {
  ScratchDir d;
  json j = minimal_config();
  j["model_type"] = "gemma";  // the Llama family (llama, qwen2, mistral) has its own tests: test_llama_hf_parity
  std::string p = write_config(d, j);
  EXPECT_INPUT_ERROR(load_gpt2_config(p), p, "model_type", "gemma");
  j["model_type"] = "gpt2";
  p = write_config(d, j);
  EXPECT_NO_THROW(load_gpt2_config(p));
}

TEST(GPT2ConfigJson, NonTanhActivationRejected) {
  ScratchDir d;
  json j = minimal_config();
  for (const char* act : {"relu", "gelu"}) {
    SCOPED_TRACE(act);
    j["activation_function"] = act;
    std::string p = write_config(d, j);
    EXPECT_INPUT_ERROR(load_gpt2_config(p), p, "activation_function", act);
  }
  for (const char* act : {"gelu_new", "gelu_pytorch_tanh"}) {
    SCOPED_TRACE(act);
    j["activation_function"] = act;
    std::string p = write_config(d, j);
    EXPECT_NO_THROW(load_gpt2_config(p));
  }
}

TEST(GPT2ConfigJson, NInnerMustBeFourTimesEmbdOrNull) {
  ScratchDir d;
  json j = minimal_config();  // n_embd 8
  j["n_inner"] = 16;
  std::string p = write_config(d, j);
  EXPECT_INPUT_ERROR(load_gpt2_config(p), p, "n_inner", "16");
  j["n_inner"] = 32;
  p = write_config(d, j);
  EXPECT_NO_THROW(load_gpt2_config(p));
  j["n_inner"] = nullptr;
  p = write_config(d, j);
  EXPECT_NO_THROW(load_gpt2_config(p));
  j["n_inner"] = "32";
  p = write_config(d, j);
  EXPECT_INPUT_ERROR(load_gpt2_config(p), p, "n_inner");
}

TEST(GPT2ConfigJson, UntiedEmbeddingsRejected) {
  ScratchDir d;
  json j = minimal_config();
  j["tie_word_embeddings"] = false;
  std::string p = write_config(d, j);
  EXPECT_INPUT_ERROR(load_gpt2_config(p), p, "tie_word_embeddings");
  j["tie_word_embeddings"] = true;
  p = write_config(d, j);
  EXPECT_NO_THROW(load_gpt2_config(p));
}

TEST(GPT2ConfigJson, NotJsonOrNotObjectOrMissingFile) {
  ScratchDir d;
  std::string p = d.file("config.json");
  write_bytes(p, "vocab_size = 17\n");
  EXPECT_INPUT_ERROR(load_gpt2_config(p), p, "JSON");
  write_bytes(p, "[17, 9, 8]");
  EXPECT_INPUT_ERROR(load_gpt2_config(p), p, "object");
  const std::string missing = d.file("absent.json");
  EXPECT_INPUT_ERROR(load_gpt2_config(missing), missing);
}

TEST(GPT2ConfigJson, ValidMinimalConfigValues) {
  ScratchDir d;
  json j = minimal_config();
  GPT2Config c = load_gpt2_config(write_config(d, j));
  EXPECT_EQ(c.vocab_size, 17);
  EXPECT_EQ(c.max_seq_len, 9);
  EXPECT_EQ(c.n_embd, 8);
  EXPECT_EQ(c.n_layer, 1);
  EXPECT_EQ(c.n_head, 2);
  EXPECT_EQ(c.ln_eps, 1e-5);  // default
  j["layer_norm_epsilon"] = 1e-6;
  c = load_gpt2_config(write_config(d, j));
  EXPECT_EQ(c.ln_eps, 1e-6);
}

TEST(GPT2ConfigJson, RealFixtureConfigAccepted) {
  GPT2Config c = load_gpt2_config(kFixtureConfig);
  EXPECT_EQ(c.vocab_size, 96);
  EXPECT_EQ(c.max_seq_len, 24);
  EXPECT_EQ(c.n_embd, 48);
  EXPECT_EQ(c.n_layer, 2);
  EXPECT_EQ(c.n_head, 3);
  EXPECT_EQ(c.ln_eps, 1e-5);
}

TEST(GPT2ConfigJson, WrittenConfigRoundTrips) {
  ScratchDir d;
  GPT2Config c;
  c.vocab_size = 1234;
  c.max_seq_len = 77;
  c.n_embd = 60;
  c.n_layer = 5;
  c.n_head = 6;
  c.ln_eps = 3.0e-7;
  const std::string p = d.file("config.json");
  write_file_atomic(p, gpt2_config_json(c));
  GPT2Config r = load_gpt2_config(p);
  EXPECT_EQ(r.vocab_size, c.vocab_size);
  EXPECT_EQ(r.max_seq_len, c.max_seq_len);
  EXPECT_EQ(r.n_embd, c.n_embd);
  EXPECT_EQ(r.n_layer, c.n_layer);
  EXPECT_EQ(r.n_head, c.n_head);
  EXPECT_EQ(r.ln_eps, c.ln_eps);
  json j = json::parse(read_bytes(p));
  EXPECT_EQ(j["model_type"], "gpt2");
  EXPECT_EQ(j["tie_word_embeddings"], true);
  EXPECT_EQ(j["n_ctx"], 77);
}

// ---------------------------------------------------------------------------------------------------------------
// Checkpoint weights: variants of the real HF fixture
// ---------------------------------------------------------------------------------------------------------------

TEST(GPT2Checkpoint, FixtureLoadsWithNothingIgnored) {
  auto be = make_cpu_backend(1);
  LoadReport report;
  report.ignored.push_back("stale");  // must be overwritten
  auto m = load_gpt2_checkpoint(*be, kFixtureDir, DType::F32, &report);
  EXPECT_TRUE(report.ignored.empty());
  EXPECT_EQ(m->config().n_embd, 48);
  // Spot check: the loaded parameters are the stored values.
  SafetensorsFile f(kFixtureModel);
  for (const char* name : {"wte.weight", "h.1.mlp.c_proj.weight", "ln_f.bias"}) {
    SCOPED_TRACE(name);
    Tensor stored = f.read(std::string("transformer.") + name);
    Tensor host = Tensor::host(stored.shape(), DType::F32);
    be->copy_to_host(host, m->param(name));
    EXPECT_TRUE(same_bytes(host, stored));
  }
}

TEST(GPT2Checkpoint, MissingDirectoryOrFiles) {
  ScratchDir d;
  auto be = make_cpu_backend(1);
  const std::string missing = d.file("no_such_ckpt");
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, missing, DType::F32), missing);
  // Directory with config.json but no model.safetensors.
  write_bytes(d.file("config.json"), read_bytes(kFixtureConfig));
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), "model.safetensors");
}

TEST(GPT2Checkpoint, NamesWithoutTransformerPrefixLoadIdentically) {
  ScratchDir d;
  NamedTensors ts = fixture_tensors();
  for (auto& [n, t] : ts) {
    ASSERT_EQ(n.rfind("transformer.", 0), 0u) << n;
    n = n.substr(12);
  }
  write_checkpoint(d.str(), ts);
  auto be = make_cpu_backend(1);
  auto m = load_gpt2_checkpoint(*be, d.str(), DType::F32);
  EXPECT_TRUE(bit_identical(host_params(*m), fixture_params_f32()));
}

TEST(GPT2Checkpoint, SameTensorWithAndWithoutPrefixRejected) {
  ScratchDir d;
  NamedTensors ts = fixture_tensors();
  Tensor ln = *find_tensor(ts, "transformer.ln_f.bias");
  ts.emplace_back("ln_f.bias", ln);
  write_checkpoint(d.str(), ts);
  auto be = make_cpu_backend(1);
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), "ln_f.bias", "twice");
}

TEST(GPT2Checkpoint, BF16WeightsLoadWithinBf16Rounding) {
  ScratchDir d;
  NamedTensors ts = fixture_tensors();
  for (auto& [n, t] : ts) t = convert_host(t, DType::BF16, n);
  write_checkpoint(d.str(), ts);
  ASSERT_EQ(SafetensorsFile(d.file("model.safetensors")).entries()[0].dtype, DType::BF16);
  auto be = make_cpu_backend(1);
  auto m = load_gpt2_checkpoint(*be, d.str(), DType::F32);
  const std::vector<float> got = host_params(*m), ref = fixture_params_f32();
  ASSERT_EQ(got.size(), ref.size());
  size_t changed = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_LE(std::fabs(got[i] - ref[i]), std::ldexp(std::fabs(ref[i]), -8)) << "param " << i;
    ASSERT_EQ(f32_bits(got[i]), f32_bits(bf16_round(ref[i]))) << "param " << i << " ref " << ref[i];
    changed += got[i] != ref[i];
  }
  EXPECT_GT(changed, ref.size() / 2) << "the BF16 file should not hold the exact F32 values";
}

TEST(GPT2Checkpoint, F64WeightsLoadExactlyIntoF32Model) {
  ScratchDir d;
  NamedTensors ts = fixture_tensors();
  for (auto& [n, t] : ts) t = convert_host(t, DType::F64, n);
  write_checkpoint(d.str(), ts);
  auto be = make_cpu_backend(1);
  auto m = load_gpt2_checkpoint(*be, d.str(), DType::F32);
  EXPECT_TRUE(bit_identical(host_params(*m), fixture_params_f32()));
}

TEST(GPT2Checkpoint, AttentionBiasBufferIgnoredAndReported) {
  ScratchDir d;
  NamedTensors ts = fixture_tensors();
  ts.emplace_back("transformer.h.0.attn.bias", Tensor::host({1, 1, 24, 24}, DType::F32));
  ts.emplace_back("h.1.attn.masked_bias", make_tensor<float>({}, {-1e4f}));
  write_checkpoint(d.str(), ts);
  auto be = make_cpu_backend(1);
  LoadReport report;
  auto m = load_gpt2_checkpoint(*be, d.str(), DType::F32, &report);
  std::vector<std::string> ignored = report.ignored;
  std::sort(ignored.begin(), ignored.end());
  EXPECT_EQ(ignored, (std::vector<std::string>{"h.1.attn.masked_bias", "transformer.h.0.attn.bias"}));
  EXPECT_TRUE(bit_identical(host_params(*m), fixture_params_f32()));
}

TEST(GPT2Checkpoint, LmHeadEqualToWteAccepted) {
  ScratchDir d;
  NamedTensors ts = fixture_tensors();
  Tensor wte = *find_tensor(ts, "transformer.wte.weight");
  Tensor copy = convert_host(wte, DType::F32, "copy");  // a separate buffer with the same bytes
  ts.emplace_back("lm_head.weight", copy);
  write_checkpoint(d.str(), ts);
  auto be = make_cpu_backend(1);
  auto m = load_gpt2_checkpoint(*be, d.str(), DType::F32);
  EXPECT_TRUE(bit_identical(host_params(*m), fixture_params_f32()));
}

TEST(GPT2Checkpoint, LmHeadDifferentFromWteRejected) {
  ScratchDir d;
  NamedTensors ts = fixture_tensors();
  Tensor head = convert_host(*find_tensor(ts, "transformer.wte.weight"), DType::F32, "copy");
  head.data<float>()[head.numel() - 1] += 0.5f;  // one element differs
  ts.emplace_back("lm_head.weight", head);
  write_checkpoint(d.str(), ts);
  auto be = make_cpu_backend(1);
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), "model.safetensors", "lm_head");
}

TEST(GPT2Checkpoint, LmHeadWithWrongShapeRejected) {
  ScratchDir d;
  NamedTensors ts = fixture_tensors();
  ts.emplace_back("lm_head.weight", Tensor::host({95, 48}, DType::F32));
  write_checkpoint(d.str(), ts);
  auto be = make_cpu_backend(1);
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), "lm_head", "[95, 48]");
}

TEST(GPT2Checkpoint, MissingTensorNamed) {
  ScratchDir d;
  NamedTensors ts = fixture_tensors();
  const size_t before = ts.size();
  std::erase_if(ts, [](const auto& p) { return p.first == "transformer.h.1.mlp.c_fc.bias"; });
  ASSERT_EQ(ts.size(), before - 1);
  write_checkpoint(d.str(), ts);
  auto be = make_cpu_backend(1);
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), d.file("model.safetensors"),
                     "h.1.mlp.c_fc.bias", "missing");
}

TEST(GPT2Checkpoint, WrongShapeNamesTensorAndBothShapes) {
  ScratchDir d;
  NamedTensors ts = fixture_tensors();
  *find_tensor(ts, "transformer.h.0.attn.c_attn.weight") = Tensor::host({144, 48}, DType::F32);  // transposed
  write_checkpoint(d.str(), ts);
  auto be = make_cpu_backend(1);
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), d.file("model.safetensors"),
                     "h.0.attn.c_attn.weight", "[144, 48]", "[48, 144]");
}

TEST(GPT2Checkpoint, UnexpectedTensorNamed) {
  ScratchDir d;
  NamedTensors ts = fixture_tensors();
  ts.emplace_back("transformer.h.0.mlp.c_gate.weight", Tensor::host({48, 192}, DType::F32));
  write_checkpoint(d.str(), ts);
  auto be = make_cpu_backend(1);
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), d.file("model.safetensors"),
                     "transformer.h.0.mlp.c_gate.weight", "unexpected");
}

TEST(GPT2Checkpoint, IntegerWeightRejectedNamingTensorAndDtype) {
  ScratchDir d;
  NamedTensors ts = fixture_tensors();
  *find_tensor(ts, "transformer.ln_f.weight") = Tensor::host({48}, DType::I32);
  write_checkpoint(d.str(), ts);
  auto be = make_cpu_backend(1);
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), d.file("model.safetensors"), "ln_f.weight",
                     "I32");
}

TEST(GPT2Checkpoint, ConfigInconsistentWithWeights) {
  ScratchDir d;
  json j = json::parse(read_bytes(kFixtureConfig));
  j["n_embd"] = 24;  // still divisible by n_head = 3
  write_checkpoint(d.str(), fixture_tensors(), j.dump());
  auto be = make_cpu_backend(1);
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), "wte.weight", "[96, 48]", "[96, 24]");

  // One layer more than stored: the first tensor of the missing layer is named.
  j = json::parse(read_bytes(kFixtureConfig));
  j["n_layer"] = 3;
  write_bytes(d.file("config.json"), j.dump());
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), "h.2.");

  // One layer fewer: layer 1's tensors are unexpected.
  j["n_layer"] = 1;
  write_bytes(d.file("config.json"), j.dump());
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), "h.1.");
}

TEST(GPT2Checkpoint, SaveLoadRoundTripIsBitIdentical) {
  ScratchDir d;
  auto be = make_cpu_backend(1);
  auto m = load_gpt2_checkpoint(*be, kFixtureDir, DType::F32);
  const std::string out = d.file("nested/out");  // created by the writer
  save_gpt2_checkpoint(*m, out);

  auto m2 = load_gpt2_checkpoint(*be, out, DType::F32);
  EXPECT_TRUE(bit_identical(host_params(*m2), host_params(*m)));

  GPT2Config c = load_gpt2_config(out + "/config.json");
  const GPT2Config& o = m->config();
  EXPECT_EQ(c.vocab_size, o.vocab_size);
  EXPECT_EQ(c.max_seq_len, o.max_seq_len);
  EXPECT_EQ(c.n_embd, o.n_embd);
  EXPECT_EQ(c.n_layer, o.n_layer);
  EXPECT_EQ(c.n_head, o.n_head);
  EXPECT_EQ(c.ln_eps, o.ln_eps);

  SafetensorsFile written(out + "/model.safetensors");
  SafetensorsFile orig(kFixtureModel);
  EXPECT_EQ(written.metadata().at("format"), "pt");
  ASSERT_EQ(written.entries().size(), orig.entries().size());
  for (const auto& e : written.entries()) {
    SCOPED_TRACE(e.name);
    EXPECT_EQ(e.name.rfind("transformer.", 0), 0u);
    EXPECT_EQ(e.dtype, DType::F32);
    ASSERT_NE(orig.find(e.name), nullptr);
    EXPECT_TRUE(same_bytes(written.read(e.name), orig.read(e.name)));  // same names, same bytes as HF wrote
  }
  EXPECT_EQ(data_start_of(out + "/model.safetensors") % 8, 0u);
  for (const auto& entry : fs::directory_iterator(out))
    EXPECT_EQ(entry.path().filename().string().find(".tmp."), std::string::npos) << entry.path();

  // What transformers wrote beyond the weights is carried on: the special-token ids (95 in the fixture, not
  // vocab_size - 1), the keys the saver does not write itself, and generation_config.json byte for byte.
  const json orig_cfg = json::parse(read_bytes(kFixtureConfig));
  const json saved_cfg = json::parse(read_bytes(out + "/config.json"));
  EXPECT_EQ(saved_cfg["bos_token_id"], 95);
  EXPECT_EQ(saved_cfg["eos_token_id"], 95);
  EXPECT_EQ(c.bos_token_id, 95);
  EXPECT_EQ(c.eos_token_id, 95);
  for (const char* key : {"pad_token_id", "summary_type", "summary_use_proj", "use_cache", "add_cross_attention"}) {
    ASSERT_TRUE(saved_cfg.contains(key)) << key;
    EXPECT_EQ(saved_cfg[key], orig_cfg[key]) << key;
  }
  EXPECT_FALSE(saved_cfg.contains("dtype"));  // the stored weights are F32 whatever was loaded: torch_dtype says so
  EXPECT_EQ(saved_cfg["torch_dtype"], "float32");
  EXPECT_EQ(read_bytes(out + "/generation_config.json"), read_bytes(kFixtureDir + "/generation_config.json"));
}

// Special-token ids that are not non-negative integers (null here) are written back as they were, and a config
// without them gets GPT-2's convention (the last id), as before.
TEST(GPT2ConfigJson, SpecialTokenIdsRoundTripOrDefault) {
  ScratchDir d;
  json j = minimal_config();
  GPT2Config plain = load_gpt2_config(write_config(d, j));
  EXPECT_EQ(plain.eos_token_id, -1);
  json w = json::parse(gpt2_config_json(plain));
  EXPECT_EQ(w["bos_token_id"], 16);
  EXPECT_EQ(w["eos_token_id"], 16);
  j["bos_token_id"] = nullptr;
  j["eos_token_id"] = 3;
  j["task_specific_params"] = {{"text-generation", {{"do_sample", true}, {"max_length", 50}}}};
  GPT2Config c = load_gpt2_config(write_config(d, j));
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_EQ(c.eos_token_id, 3);
  w = json::parse(gpt2_config_json(c));
  EXPECT_TRUE(w.contains("bos_token_id") && w["bos_token_id"].is_null()) << w.dump();
  EXPECT_EQ(w["eos_token_id"], 3);
  EXPECT_EQ(w["task_specific_params"], j["task_specific_params"]);
  // A key the saver writes itself keeps the saver's value (the weights are saved F32, without dropout).
  j["torch_dtype"] = "bfloat16";
  j["resid_pdrop"] = 0.1;
  w = json::parse(gpt2_config_json(load_gpt2_config(write_config(d, j))));
  EXPECT_EQ(w["torch_dtype"], "float32");
  EXPECT_EQ(w["resid_pdrop"], 0.0);
}

TEST(GPT2Checkpoint, GenerationConfigNotJsonRejectedNamingIt) {
  ScratchDir d;
  fs::copy_file(kFixtureConfig, d.file("config.json"));
  fs::copy_file(kFixtureModel, d.file("model.safetensors"));
  auto be = make_cpu_backend(1);
  write_bytes(d.file("generation_config.json"), "{\"eos_token_id\": 95,");
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), d.file("generation_config.json"), "JSON");
  write_bytes(d.file("generation_config.json"), "[95]");
  EXPECT_INPUT_ERROR(load_gpt2_checkpoint(*be, d.str(), DType::F32), d.file("generation_config.json"), "object");
}

// An HF GPT-2 directory as transformers writes it for the real GPT-2 vocabulary (<|endoftext|> = 50256, a
// generation_config.json) goes through load -> one DPO step -> checkpoint -> load with its ids and its
// generation_config.json intact, and the checkpoint's checksums cover generation_config.json.
TEST(GPT2Checkpoint, HfIdsAndGenerationConfigSurviveTraining) {
  ScratchDir d;
  auto be = make_cpu_backend(1);
  GPT2Config gc;
  gc.vocab_size = 50257;
  gc.max_seq_len = 32;
  gc.n_embd = 8;
  gc.n_head = 2;
  gc.n_layer = 1;
  {
    GPT2 m(*be, gc, DType::F32);
    Rng rng(11);
    m.init_random(rng);
    save_gpt2_checkpoint(m, d.file("src"));
  }
  json cfg = json::parse(read_bytes(d.file("src/config.json")));
  cfg["bos_token_id"] = 50256;
  cfg["eos_token_id"] = 50256;
  cfg["_name_or_path"] = "gpt2";
  cfg["pad_token_id"] = nullptr;
  cfg["task_specific_params"] = {{"text-generation", {{"do_sample", true}, {"max_length", 50}}}};
  cfg["transformers_version"] = "4.44.2";
  write_bytes(d.file("src/config.json"), cfg.dump(2));
  // Keys out of order and no final newline: any rewriting would show.
  const std::string gen =
      "{\n  \"transformers_version\": \"4.44.2\",\n  \"eos_token_id\": 50256,\n  \"bos_token_id\": 50256,\n"
      "  \"do_sample\": true,\n  \"top_p\": 0.9\n}";
  write_bytes(d.file("src/generation_config.json"), gen);
  {
    std::ofstream pref(d.file("pref.jsonl"));
    for (int i = 0; i < 4; ++i)
      pref << json{{"prompt", "q" + std::to_string(i) + ":"}, {"chosen", " yes"}, {"rejected", " no way"}}.dump()
           << "\n";
  }
  TrainConfig tc;
  tc.model = d.file("src");
  tc.train_file = d.file("pref.jsonl");
  tc.out_dir = d.file("out");
  tc.ref_cache_dir = d.file("cache");
  tc.max_length = 16;
  tc.max_prompt_length = 8;
  tc.per_device_train_batch_size = 4;
  tc.max_steps = 1;
  tc.learning_rate = 1e-2;
  RunOptions ro;
  ro.quiet = true;
  ASSERT_EQ(run_training(tc, RunKind::Dpo, ro).steps, 1);
  const std::string ck = d.file("out/checkpoints/step-1");

  EXPECT_EQ(read_bytes(ck + "/generation_config.json"), gen);
  const json saved = json::parse(read_bytes(ck + "/config.json"));
  EXPECT_EQ(saved["bos_token_id"], 50256);
  EXPECT_EQ(saved["eos_token_id"], 50256);
  EXPECT_EQ(saved["_name_or_path"], "gpt2");
  EXPECT_TRUE(saved.contains("pad_token_id") && saved["pad_token_id"].is_null());
  EXPECT_EQ(saved["task_specific_params"], cfg["task_specific_params"]);
  const json sums = json::parse(read_bytes(ck + "/checksums.json"));
  ASSERT_TRUE(sums["files"].contains("generation_config.json")) << sums.dump(2);
  EXPECT_EQ(sums["files"]["generation_config.json"], sha256_file(ck + "/generation_config.json"));
  EXPECT_TRUE(verify_checkpoint(ck, CheckpointUse::Resume));

  auto m = load_gpt2_checkpoint(*be, ck, DType::F32);
  EXPECT_EQ(m->config().bos_token_id, 50256);
  EXPECT_EQ(m->config().eos_token_id, 50256);
  EXPECT_EQ(m->config().generation_config, gen);
  // The step did train: the weights are not the source's.
  auto src = load_gpt2_checkpoint(*be, d.file("src"), DType::F32);
  EXPECT_FALSE(bit_identical(host_params(*m), host_params(*src)));

  // generation_config.json is verified like every other file: a changed byte, or an entry removed from the list,
  // is refused naming it.
  const std::string bad = d.file("bad");
  fs::copy(ck, bad, fs::copy_options::recursive);
  write_bytes(bad + "/generation_config.json", gen + " ");
  EXPECT_INPUT_ERROR(verify_checkpoint(bad, CheckpointUse::Model), bad + "/generation_config.json", "SHA-256");
  write_checksums(bad, {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"});
  EXPECT_INPUT_ERROR(verify_checkpoint(bad, CheckpointUse::Model), bad + "/generation_config.json", "not listed");
}

TEST(GPT2Checkpoint, F64ModelSavesF32FileEqualToFixture) {
  ScratchDir d;
  auto be = make_cpu_backend(1);
  auto m = load_gpt2_checkpoint(*be, kFixtureDir, DType::F64);
  save_gpt2_checkpoint(*m, d.str());
  auto m32 = load_gpt2_checkpoint(*be, d.str(), DType::F32);
  EXPECT_TRUE(bit_identical(host_params(*m32), fixture_params_f32()));
}

// ---------------------------------------------------------------------------------------------------------------
// CLI exit codes
// ---------------------------------------------------------------------------------------------------------------

struct CliResult {
  int code = -1;
  std::string out, err;
};

std::string sh_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

CliResult run_dpo(const ScratchDir& d, const std::string& args) {
  CliResult r;
  if (!fs::exists(kDpoBinary)) {
    ADD_FAILURE() << "the dpo binary is not built: " << kDpoBinary;
    return r;
  }
  const std::string out = d.file("cli.stdout"), err = d.file("cli.stderr");
  const std::string cmd = sh_quote(kDpoBinary) + " " + args + " >" + sh_quote(out) + " 2>" + sh_quote(err);
  const int status = std::system(cmd.c_str());
  EXPECT_TRUE(WIFEXITED(status)) << cmd << " status " << status;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = read_bytes(out);
  r.err = read_bytes(err);
  fs::remove(out);
  fs::remove(err);
  return r;
}

TEST(DpoCli, HelpExitsZeroAndListsInfo) {
  ScratchDir d;
  CliResult r = run_dpo(d, "--help");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE((r.out + r.err).find("info"), std::string::npos) << r.out << r.err;
  EXPECT_NE((r.out + r.err).find("init"), std::string::npos) << r.out << r.err;
}

TEST(DpoCli, NoSubcommandIsUsageError) {
  ScratchDir d;
  CliResult r = run_dpo(d, "");
  EXPECT_EQ(r.code, 2) << r.out << r.err;
  r = run_dpo(d, "frobnicate");
  EXPECT_EQ(r.code, 2) << r.out << r.err;
}

TEST(DpoCli, InfoMissingDirectory) {
  ScratchDir d;
  const std::string missing = d.file("no_checkpoint_here");
  CliResult r = run_dpo(d, "info " + sh_quote(missing));
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find(missing), std::string::npos) << r.err;
}

TEST(DpoCli, InfoTruncatedSafetensors) {
  ScratchDir d;
  const std::string ck = d.file("ckpt");
  fs::create_directories(ck);
  write_bytes(ck + "/config.json", read_bytes(kFixtureConfig));
  const std::string bytes = read_bytes(kFixtureModel);
  write_bytes(ck + "/model.safetensors", bytes.substr(0, bytes.size() / 2));
  CliResult r = run_dpo(d, "info " + sh_quote(ck));
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("truncated"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(ck + "/model.safetensors"), std::string::npos) << r.err;
}

TEST(DpoCli, InfoBadConfigNamesField) {
  ScratchDir d;
  const std::string ck = d.file("ckpt");
  fs::create_directories(ck);
  json j = json::parse(read_bytes(kFixtureConfig));
  j["n_layer"] = "2";
  write_bytes(ck + "/config.json", j.dump());
  fs::copy_file(kFixtureModel, ck + "/model.safetensors");
  CliResult r = run_dpo(d, "info " + sh_quote(ck));
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_NE(r.err.find("n_layer"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("config.json"), std::string::npos) << r.err;
}

TEST(DpoCli, InfoOnFixture) {
  ScratchDir d;
  CliResult r = run_dpo(d, "info " + sh_quote(kFixtureDir));
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("62400"), std::string::npos) << r.out;  // parameter count of the tiny model
  EXPECT_NE(r.out.find("48"), std::string::npos) << r.out;
}

TEST(DpoCli, InitRejectsEmbdNotDivisibleByHeads) {
  ScratchDir d;
  const std::string out = d.file("model");
  CliResult r = run_dpo(d, "init --out " + sh_quote(out) + " --n-embd 10 --n-head 3");
  EXPECT_EQ(r.code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find("n_head"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(out + "/model.safetensors"));
}

TEST(DpoCli, InitThenInfo) {
  ScratchDir d;
  const std::string out = d.file("model");
  CliResult r = run_dpo(d, "init --out " + sh_quote(out) +
                               " --n-layer 1 --n-head 2 --n-embd 8 --vocab-size 17 --n-positions 9 --seed 5");
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_TRUE(fs::exists(out + "/config.json"));
  EXPECT_TRUE(fs::exists(out + "/model.safetensors"));
  r = run_dpo(d, "info " + sh_quote(out));
  EXPECT_EQ(r.code, 0) << r.out << r.err;

  // The written checkpoint is what was asked for.
  GPT2Config c = load_gpt2_config(out + "/config.json");
  EXPECT_EQ(c.eos_token_id, 16);  // a vocabulary the byte tokenizer cannot use: GPT-2's last-id convention
  EXPECT_EQ(c.n_layer, 1);
  EXPECT_EQ(c.n_head, 2);
  EXPECT_EQ(c.n_embd, 8);
  EXPECT_EQ(c.vocab_size, 17);
  EXPECT_EQ(c.max_seq_len, 9);
  auto be = make_cpu_backend(1);
  auto m = load_gpt2_checkpoint(*be, out, DType::F32);
  EXPECT_EQ(m->params().numel(), c.num_parameters());
}

// `dpo init` makes a model for the byte tokenizer: config.json names its EOS (256) for bos and eos.
TEST(DpoCli, InitWritesByteTokenizerEos) {
  ScratchDir d;
  const std::string out = d.file("model");
  CliResult r = run_dpo(d, "init --out " + sh_quote(out) + " --n-layer 1 --n-head 2 --n-embd 8 --vocab-size 300 " +
                               "--n-positions 9");
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  const json j = json::parse(read_bytes(out + "/config.json"));
  EXPECT_EQ(j["bos_token_id"], 256);
  EXPECT_EQ(j["eos_token_id"], 256);
}

TEST(DpoCli, InitBadFlagValueIsUsageError) {
  ScratchDir d;
  CliResult r = run_dpo(d, "init --out " + sh_quote(d.file("m")) + " --n-embd eight");
  EXPECT_EQ(r.code, 2) << r.out << r.err;
  r = run_dpo(d, "init --n-embd 8");  // --out is required
  EXPECT_EQ(r.code, 2) << r.out << r.err;
}

}  // namespace
}  // namespace dpo
