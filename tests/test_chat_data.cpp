// Chat data and the model directory around it: token-id records made by tools/prepare_data.py from TRL's
// conversational format (tests/fixtures/chat, written by gen_chat_fixture.py with HF transformers' chat template),
// read through train/data.h and decoded with train/tokenizer_json.h; checkpoints that carry the run's tokenizer
// files; the pad id (results must not depend on it); and checkpoints the trainer saves in shards.
//
// The expected conversations are written out by hand from the fixture's ChatML template
// ("<|im_start|>{role}\n{content}<|im_end|>\n" per message, "<|im_start|>assistant\n" as the generation prompt),
// not taken from any output.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/checkpoint.h"
#include "runtime/backend.h"
#include "runtime/safetensors.h"
#include "train/data.h"
#include "train/hash.h"
#include "train/tokenizer_json.h"
#include "train/trainer.h"
#include "test_util.h"

namespace dpo {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kChatDir = std::string(DPO_FIXTURE_DIR) + "/chat";
const std::string kTokDir = kChatDir + "/tokenizer";
const std::string kRecords = kChatDir + "/records.jsonl";
const char* const kTokFiles[] = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"};

std::string turn(const std::string& role, const std::string& content) {
  return "<|im_start|>" + role + "\n" + content + "<|im_end|>\n";
}
const std::string kGen = "<|im_start|>assistant\n";

struct Expected {
  std::string prompt, chosen, rejected;
};

// The fixture's four conversations (conversations.jsonl) through the template.
std::vector<Expected> expected_conversations() {
  return {
      {turn("user", "What color is the sky?") + kGen, "It is blue.<|im_end|>\n", "It is green.<|im_end|>\n"},
      // implicit prompt: the shared system + user messages
      {turn("system", "You are a helpful assistant.") + turn("user", "Where is the sun?") + kGen,
       "In the sky.<|im_end|>\n", "In the sea.<|im_end|>\n"},
      {turn("user", "Tell me a joke.") + turn("assistant", "Why did the chicken cross the road?") +
           turn("user", "Why?") + kGen,
       "To get to the other side.<|im_end|>\n", "No.<|im_end|>\n"},
      {turn("user", "Translate to French: good morning, caf\u00e9 cr\u00e8me.") + kGen,
       "Bonjour, caf\u00e9 cr\u00e8me.<|im_end|>\n", "Bonsoir, cr\u00e8me br\u00fbl\u00e9e.<|im_end|>\n"},
  };
}

std::vector<int32_t> cat(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  std::vector<int32_t> r = a;
  r.insert(r.end(), b.begin(), b.end());
  return r;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

TEST(ChatData, RecordsDecodeToTheTemplatedConversation) {
  const JsonTokenizer tok(kTokDir + "/tokenizer.json");
  DataOptions o;
  o.max_length = 1000;
  o.append_eos = false;  // the records as prepare_data.py wrote them
  o.vocab_size = tok.vocab_size();
  LoadStats st;
  const auto pairs = load_preferences(kRecords, tok, o, &st);
  const auto want = expected_conversations();
  ASSERT_EQ(pairs.size(), want.size());
  EXPECT_EQ(st.truncated, 0);
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE("record " + std::to_string(i));
    const PreferencePair& p = pairs[i];
    EXPECT_EQ(tok.decode(p.prompt, SpecialTokens::Keep), want[i].prompt);
    EXPECT_EQ(tok.decode(p.chosen, SpecialTokens::Keep), want[i].chosen);
    EXPECT_EQ(tok.decode(p.rejected, SpecialTokens::Keep), want[i].rejected);
    // The ids are those of the whole templated conversation (our tokenizer, checked against HF's in
    // test_tokenizer_json, encodes the expected text to the same ids): the prompt ends on a token boundary.
    EXPECT_EQ(cat(p.prompt, p.chosen), tok.encode(want[i].prompt + want[i].chosen));
    EXPECT_EQ(cat(p.prompt, p.rejected), tok.encode(want[i].prompt + want[i].rejected));
    EXPECT_EQ(p.prompt, tok.encode(want[i].prompt));
    // Skipping special tokens leaves the plain text.
    EXPECT_EQ(tok.decode(p.chosen), want[i].chosen.substr(0, want[i].chosen.size() - 11) + "\n");
  }
  EXPECT_TRUE(pairs[2].has_scores);
  EXPECT_EQ(pairs[2].score_chosen, 8.5);
  EXPECT_EQ(pairs[2].score_rejected, 2.0);
}

TEST(ChatData, TheTrainerAppendsEosAfterTheTemplatesClosingNewline) {
  // The template closes an assistant turn with "<|im_end|>\n": the completion ends with "\n", not with the EOS
  // (<|im_end|>), so the loader appends one (docs/training.md, "Chat data").
  const JsonTokenizer tok(kTokDir + "/tokenizer.json");
  const int32_t im_end = tok.token_id("<|im_end|>");
  ASSERT_GE(im_end, 0);
  DataOptions o;
  o.max_length = 1000;
  o.vocab_size = tok.vocab_size();
  o.ids_eos_id = im_end;
  const auto pairs = load_preferences(kRecords, tok, o, nullptr);
  EXPECT_EQ(tok.decode(pairs[0].chosen, SpecialTokens::Keep), "It is blue.<|im_end|>\n<|im_end|>");
}

// ---------------------------------------------------------------------------------------------------------------
// Training on chat records: the tokenizer in checkpoints, the pad id, sharded checkpoints
// ---------------------------------------------------------------------------------------------------------------

struct ChatRun : test::ScratchDir {
  ChatRun() : ScratchDir("dpo_chat_") {}
};

// No pad_token_id in config.json (config_pad): the key absent, or null as Llama 3's config.json has it.
constexpr int64_t kNoPad = -1, kNullPad = -2;

// A tiny GPT-2 (or, with Arch::Llama, a tiny Llama: grouped-query heads, untied head) over the fixture tokenizer's
// vocabulary in `dir` (config.json: eos_token_id = <|im_end|>, and pad_token_id when >= 0, null for kNullPad),
// with the tokenizer files beside it when `with_tokenizer`.
void write_model(const std::string& dir, bool with_tokenizer, int64_t config_pad = kNoPad, Arch arch = Arch::GPT2) {
  const JsonTokenizer tok(kTokDir + "/tokenizer.json");
  auto be = make_cpu_backend(1);
  GPT2Config c;
  c.vocab_size = tok.vocab_size();
  c.max_seq_len = 128;
  c.n_embd = 16;
  c.n_head = 2;
  c.n_layer = 2;
  if (arch == Arch::Llama) {
    c.arch = Arch::Llama;
    c.model_type = "llama";
    c.n_embd = 24;
    c.n_head = 4;
    c.n_kv_head = 2;
    c.intermediate_size = 40;
    c.ln_eps = 1e-6;
    c.tie_word_embeddings = false;
  }
  c.bos_token_id = c.eos_token_id = tok.token_id("<|im_end|>");
  if (config_pad >= 0) c.hf_extra_json = json{{"pad_token_id", config_pad}}.dump();
  if (config_pad == kNullPad) c.hf_extra_json = json{{"pad_token_id", nullptr}}.dump();
  GPT2 m(*be, c, DType::F32);
  Rng rng(11);
  m.init_random(rng);
  save_gpt2_checkpoint(m, dir);
  if (with_tokenizer)
    for (const char* f : kTokFiles) fs::copy_file(kTokDir + "/" + f, dir + "/" + f);
}

TrainConfig chat_config(const ChatRun& w, const std::string& model, const std::string& out) {
  TrainConfig c;
  c.model = model;
  c.train_file = kRecords;
  c.out_dir = w / out;
  c.ref_cache_dir = w / "cache";
  c.max_length = 128;
  c.learning_rate = 1e-2;
  c.per_device_train_batch_size = 2;  // records of different lengths: every batch has padding
  c.num_train_epochs = 2;
  c.logging_steps = 1;
  c.seed = 5;
  return c;
}

RunOptions quiet() {
  RunOptions r;
  r.quiet = true;
  return r;
}

json checksums_of(const std::string& dir) {
  std::ifstream f(dir + "/" + kChecksumsFile);
  return json::parse(f)["files"];
}

TEST(ChatCheckpoints, CarryTheModelDirectorysTokenizerFiles) {
  ChatRun w;
  write_model(w / "model", true);
  const RunSummary r = run_training(chat_config(w, w / "model", "out"), RunKind::Dpo, quiet());
  ASSERT_FALSE(r.final_checkpoint.empty());
  const json sums = checksums_of(r.final_checkpoint);
  for (const char* f : kTokFiles) {
    SCOPED_TRACE(f);
    EXPECT_TRUE(slurp(r.final_checkpoint + "/" + f) == slurp(kTokDir + "/" + f));
    EXPECT_TRUE(sums.contains(f));
  }
  EXPECT_FALSE(fs::exists(r.final_checkpoint + "/special_tokens_map.json"));  // not in the source: not invented
  EXPECT_TRUE(verify_checkpoint(r.final_checkpoint, CheckpointUse::Resume));
  // Verified like the other files: an edited copy is caught.
  {
    std::ofstream f(r.final_checkpoint + "/tokenizer_config.json", std::ios::app);
    f << " ";
  }
  EXPECT_THROW(verify_checkpoint(r.final_checkpoint, CheckpointUse::Model), InputError);
}

TEST(ChatCheckpoints, CarryTheTokenizerKeysFile) {
  ChatRun w;
  write_model(w / "bare", false);
  TrainConfig c = chat_config(w, w / "bare", "out");
  c.tokenizer = kTokDir + "/tokenizer.json";
  c.given.insert("tokenizer");
  const RunSummary r = run_training(c, RunKind::Dpo, quiet());
  for (const char* f : kTokFiles) EXPECT_TRUE(slurp(r.final_checkpoint + "/" + f) == slurp(kTokDir + "/" + f)) << f;
  // And a model directory without any tokenizer (byte tokenizer) gets none.
  const RunSummary b = run_training(chat_config(w, w / "bare", "out_byte"), RunKind::Dpo, quiet());
  for (const char* f : kTokFiles) EXPECT_FALSE(fs::exists(b.final_checkpoint + "/" + f)) << f;
}

TEST(PadTokenId, ResultsAreBitwiseTheSameWhateverThePadId) {
  ChatRun w;
  write_model(w / "model", true, /*config_pad=*/0);
  write_model(w / "model_pad9", true, /*config_pad=*/9);
  const JsonTokenizer tok(kTokDir + "/tokenizer.json");
  TrainConfig a = chat_config(w, w / "model", "a");  // pad 0 from config.json
  TrainConfig b = chat_config(w, w / "model", "b");
  b.pad_token_id = tok.vocab_size() - 1;  // the key wins over config.json
  TrainConfig c = chat_config(w, w / "model_pad9", "c");  // pad 9 from config.json
  c.pad_to_multiple_of = 64;  // more padding columns, filled with the pad id too
  TrainConfig a64 = a;
  a64.out_dir = w / "a64";
  a64.pad_to_multiple_of = 64;
  const RunSummary ra = run_training(a, RunKind::Dpo, quiet());
  const RunSummary rb = run_training(b, RunKind::Dpo, quiet());
  const RunSummary rc = run_training(c, RunKind::Dpo, quiet());
  const RunSummary ra64 = run_training(a64, RunKind::Dpo, quiet());
  ASSERT_GT(ra.steps, 0);
  const std::string wa = slurp(ra.final_checkpoint + "/model.safetensors");
  EXPECT_TRUE(wa == slurp(rb.final_checkpoint + "/model.safetensors"));
  EXPECT_TRUE(slurp(ra64.final_checkpoint + "/model.safetensors") ==
              slurp(rc.final_checkpoint + "/model.safetensors"));
  auto metrics = [](std::map<std::string, double> m) {
    m.erase("tokens_per_second");  // wall-clock
    return m;
  };
  EXPECT_EQ(metrics(ra.last_log), metrics(rb.last_log));
  EXPECT_EQ(metrics(ra64.last_log), metrics(rc.last_log));
  EXPECT_NE(wa, slurp(w / "model/model.safetensors"));  // it trained
}

// The same for a Llama: config.json's pad_token_id is read from a Llama config too, and Llama 3's null (no pad
// id) pads with 0; none of it changes a result.
TEST(PadTokenId, LlamaResultsAreBitwiseTheSameWhateverThePadId) {
  ChatRun w;
  write_model(w / "llama_null", true, kNullPad, Arch::Llama);
  write_model(w / "llama_pad9", true, /*config_pad=*/9, Arch::Llama);
  auto be = make_cpu_backend(1);
  auto pad_of = [&](const std::string& dir) {
    return special_token_ids(load_gpt2_checkpoint(*be, dir, DType::F32)->config(), dir);
  };
  EXPECT_EQ(pad_of(w / "llama_null").pad, -1);
  const SpecialTokenIds ids = pad_of(w / "llama_pad9");
  EXPECT_EQ(ids.pad, 9);
  EXPECT_EQ(ids.pad_source, "config.json");
  const JsonTokenizer tok(kTokDir + "/tokenizer.json");
  TrainConfig a = chat_config(w, w / "llama_null", "a");  // pad 0: none named
  TrainConfig b = chat_config(w, w / "llama_null", "b");
  b.pad_token_id = tok.vocab_size() - 1;
  TrainConfig c = chat_config(w, w / "llama_pad9", "c");  // pad 9 from config.json
  const RunSummary ra = run_training(a, RunKind::Dpo, quiet());
  const RunSummary rb = run_training(b, RunKind::Dpo, quiet());
  const RunSummary rc = run_training(c, RunKind::Dpo, quiet());
  ASSERT_GT(ra.steps, 0);
  const std::string wa = slurp(ra.final_checkpoint + "/model.safetensors");
  EXPECT_TRUE(wa == slurp(rb.final_checkpoint + "/model.safetensors"));
  EXPECT_TRUE(wa == slurp(rc.final_checkpoint + "/model.safetensors"));
  auto metrics = [](std::map<std::string, double> m) {
    m.erase("tokens_per_second");  // wall-clock
    return m;
  };
  EXPECT_EQ(metrics(ra.last_log), metrics(rb.last_log));
  EXPECT_EQ(metrics(ra.last_log), metrics(rc.last_log));
  EXPECT_NE(wa, slurp(w / "llama_null/model.safetensors"));  // it trained
  // The saved config.json keeps the source's pad_token_id (null stays null).
  std::ifstream f(rc.final_checkpoint + "/config.json");
  EXPECT_EQ(json::parse(f)["pad_token_id"], 9);
}

TEST(PadTokenId, OutsideTheVocabularyNamesTheKeyOrTheFile) {
  ChatRun w;
  write_model(w / "model", true);
  const JsonTokenizer tok(kTokDir + "/tokenizer.json");
  TrainConfig c = chat_config(w, w / "model", "out");
  c.pad_token_id = tok.vocab_size();
  try {
    run_training(c, RunKind::Dpo, quiet());
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("key 'pad_token_id'"), std::string::npos) << e.what();
  }
  write_model(w / "model_bad", true, /*config_pad=*/tok.vocab_size() + 5);
  try {
    run_training(chat_config(w, w / "model_bad", "out2"), RunKind::Dpo, quiet());
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("config.json"), std::string::npos) << m;
    EXPECT_NE(m.find("pad_token_id"), std::string::npos) << m;
  }
  TrainConfig neg = chat_config(w, w / "model", "out3");
  neg.pad_token_id = -2;
  EXPECT_THROW(validate(neg, RunKind::Dpo), InputError);
}

TEST(ShardedCheckpoints, TheTrainerSavesShardsThatVerifyLoadAndMatchTheSingleFile) {
  ChatRun w;
  write_model(w / "model", true);
  TrainConfig one = chat_config(w, w / "model", "one");
  TrainConfig sharded = chat_config(w, w / "model", "sharded");
  sharded.max_shard_size = "8KB";  // the tiny model's ~30 KB of F32 weights in several shards
  const RunSummary r1 = run_training(one, RunKind::Dpo, quiet());
  const RunSummary rs = run_training(sharded, RunKind::Dpo, quiet());
  EXPECT_FALSE(fs::exists(rs.final_checkpoint + "/model.safetensors"));
  ASSERT_TRUE(fs::exists(rs.final_checkpoint + "/" + kSafetensorsIndexName));
  const SafetensorsDir a(r1.final_checkpoint), b(rs.final_checkpoint);
  EXPECT_FALSE(a.sharded());
  EXPECT_TRUE(b.sharded());
  EXPECT_GE(b.files().size(), 3u);
  const json sums = checksums_of(rs.final_checkpoint);
  for (const auto& f : b.files()) EXPECT_TRUE(sums.contains(fs::path(f).filename().string())) << f;
  EXPECT_TRUE(verify_checkpoint(rs.final_checkpoint, CheckpointUse::Resume));
  ASSERT_EQ(a.entries().size(), b.entries().size());
  for (const auto& e : a.entries()) {
    const Tensor x = a.read(e.name), y = b.read(e.name);
    ASSERT_EQ(x.nbytes(), y.nbytes()) << e.name;
    EXPECT_EQ(std::memcmp(x.raw(), y.raw(), static_cast<size_t>(x.nbytes())), 0) << e.name;
  }
  // A shard removed from the checksum list's view (an unlisted extra shard) is refused.
  fs::copy_file(b.files()[0], rs.final_checkpoint + "/model-00009-of-00009.safetensors");
  EXPECT_THROW(verify_checkpoint(rs.final_checkpoint, CheckpointUse::Model), InputError);
}

TEST(ShardedCheckpoints, ResumeFromAShardedCheckpointIsBitwiseTheUninterruptedRun) {
  ChatRun w;
  write_model(w / "model", true);
  TrainConfig full = chat_config(w, w / "model", "full");
  full.max_shard_size = "8KB";
  const RunSummary a = run_training(full, RunKind::Dpo, quiet());
  ASSERT_EQ(a.steps, 4);  // 4 records, 2 per step, 2 epochs
  TrainConfig part = full;
  part.out_dir = w / "part";
  part.save_steps = 2;
  run_training(part, RunKind::Dpo, quiet());
  fs::remove_all(fs::path(part.out_dir) / "checkpoints" / "step-4");
  RunOptions ro = quiet();
  ro.resume = (fs::path(part.out_dir) / "checkpoints" / "step-2").string();
  ASSERT_TRUE(fs::exists(ro.resume + "/" + kSafetensorsIndexName));
  const RunSummary b = run_training(part, RunKind::Dpo, ro);
  ASSERT_EQ(b.steps, 4);
  const SafetensorsDir da(a.final_checkpoint), db(b.final_checkpoint);
  ASSERT_EQ(da.files().size(), db.files().size());
  for (size_t i = 0; i < da.files().size(); ++i)
    EXPECT_TRUE(slurp(da.files()[i]) == slurp(db.files()[i])) << da.files()[i];
  EXPECT_TRUE(slurp(a.final_checkpoint + "/" + kSafetensorsIndexName) ==
              slurp(b.final_checkpoint + "/" + kSafetensorsIndexName));
  EXPECT_TRUE(slurp(a.final_checkpoint + "/optimizer.safetensors") ==
              slurp(b.final_checkpoint + "/optimizer.safetensors"));
}

TEST(ShardedCheckpoints, MaxShardSizeKeyValidated) {
  ChatRun w;
  TrainConfig c = chat_config(w, w / "model", "out");
  c.max_shard_size = "5 parsecs";
  try {
    validate(c, RunKind::Dpo);
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("max_shard_size"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dpo
