// The README's quick start runs as written: its run.yaml block and each line of its command block, found by their
// HTML-comment markers, run in a scratch directory with the built `dpo` (the only substitution: ./build/dpo) on
// small generated sft.jsonl / pairs.jsonl files, with XDG_CACHE_HOME (the reference cache) inside that directory.
// Every command must exit 0. About 10 s on two cores.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

const std::string kReadme = std::string(DPO_FIXTURE_DIR) + "/../../README.md";
const std::string kDpo = std::string(DPO_BINARY_DIR) + "/dpo";

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// The body of the first ``` fence (with info string `lang`) after the line holding `marker`; "" if absent.
std::string block_after(const std::string& text, const std::string& marker, const std::string& lang) {
  const size_t m = text.find(marker);
  if (m == std::string::npos) return "";
  const std::string open = "```" + lang + "\n";
  const size_t b = text.find(open, m);
  if (b == std::string::npos) return "";
  const size_t start = b + open.size();
  const size_t e = text.find("\n```", start - 1);
  if (e == std::string::npos) return "";
  return text.substr(start, e + 1 - start);
}

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// Seeded records of a few words each: enough for one short epoch of every command.
void write_data(const fs::path& dir) {
  std::mt19937 rng(13);
  const std::vector<std::string> words = {"the", "film", "was", "good", "bad", "plot", "actor", "scene", "dull",
                                          "great", "story", "fine"};
  auto phrase = [&](int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += (i ? " " : "") + words[rng() % words.size()];
    return s;
  };
  std::ofstream sft(dir / "sft.jsonl"), pairs(dir / "pairs.jsonl");
  for (int i = 0; i < 16; ++i) {
    sft << "{\"prompt\": \"" << phrase(4) << "\", \"completion\": \"" << phrase(6) << "\"}\n";
    pairs << "{\"prompt\": \"" << phrase(4) << "\", \"chosen\": \"good " << phrase(2) << "\", \"rejected\": \"bad "
          << phrase(2) << "\"}\n";
  }
}

TEST(Quickstart, ReadmeCommandsRunAsWritten) {
  ASSERT_TRUE(fs::exists(kDpo)) << "the dpo binary is not built: " << kDpo;
  const std::string readme = read_text(kReadme);
  ASSERT_FALSE(readme.empty()) << kReadme;
  const std::string yaml = block_after(readme, "<!-- quickstart:run.yaml", "yaml");
  const std::string cmds = block_after(readme, "<!-- quickstart:commands", "sh");
  ASSERT_FALSE(yaml.empty()) << "no ```yaml block after <!-- quickstart:run.yaml in " << kReadme;
  ASSERT_FALSE(cmds.empty()) << "no ```sh block after <!-- quickstart:commands in " << kReadme;

  const fs::path dir = fs::path(::testing::TempDir()) / "dpo_quickstart";
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "run.yaml") << yaml;
  write_data(dir);

  std::istringstream lines(cmds);
  std::string line;
  std::vector<std::string> ran;
  const std::string prefix = "./build/dpo ";
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] == '#') continue;
    ASSERT_EQ(line.rfind(prefix, 0), 0u) << "a quick-start command that does not start with " << prefix << ": "
                                         << line;
    const std::string args = line.substr(prefix.size());
    const fs::path log = dir / ("cmd" + std::to_string(ran.size()) + ".log");
    const std::string cmd = "cd " + quote(dir.string()) + " && XDG_CACHE_HOME=" + quote((dir / "cache").string()) +
                            " OMP_NUM_THREADS=2 " + quote(kDpo) + " " + args + " >" + quote(log.string()) + " 2>&1";
    const int st = std::system(cmd.c_str());
    const int code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    EXPECT_EQ(code, 0) << line << "\n" << read_text(log.string());
    ran.push_back(args.substr(0, args.find(' ')));
    if (code != 0) break;  // later commands need this one's outputs
  }
  // The block really was found and holds the whole workflow.
  for (const char* sub : {"init", "sft", "train", "eval", "sample"})
    EXPECT_NE(std::find(ran.begin(), ran.end(), sub), ran.end()) << "the quick start runs no 'dpo " << sub << "'";
}

}  // namespace
