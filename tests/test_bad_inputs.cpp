// The bad-input corpus (tests/bad_inputs, described in its README.md): every case of every <kind>/cases.txt runs
// the dpo binary in a fresh, empty working folder and must exit with the expected code (2 unless stated), print a
// message matching its regular expression (naming the file, file:line or key), leave that folder empty (no
// out_dir, no temporary or cache file; `allow` names the exceptions) and leave the corpus itself unchanged.
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

const fs::path kCorpus = DPO_BAD_INPUTS_DIR;
const fs::path kDpo = fs::path(DPO_BINARY_DIR) / "dpo";

struct Case {
  std::string kind, name, file;  // file:line of its `case` line, for failure messages
  std::vector<std::string> args;
  int exit_code = 2;
  std::vector<std::string> error, stdout_re;  // regular expressions searched in stderr / stdout
  std::vector<std::string> absent, allow;
};

std::vector<std::string> split_ws(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

// Parses every <kind>/cases.txt. A malformed manifest yields a case that fails with the reason.
std::vector<Case> load_cases() {
  std::vector<Case> cases;
  std::vector<fs::path> manifests;
  for (const auto& e : fs::directory_iterator(kCorpus))
    if (e.is_directory() && fs::exists(e.path() / "cases.txt")) manifests.push_back(e.path() / "cases.txt");
  std::sort(manifests.begin(), manifests.end());
  for (const fs::path& m : manifests) {
    const std::string kind = m.parent_path().filename().string();
    std::ifstream in(m);
    std::string line;
    int lineno = 0;
    auto bad = [&](const std::string& why) {
      Case c;
      c.kind = kind;
      c.name = "manifest_error_line" + std::to_string(lineno);
      c.file = m.string() + ":" + std::to_string(lineno) + ": " + why;
      cases.push_back(c);
    };
    while (std::getline(in, line)) {
      ++lineno;
      if (line.empty() || line[0] == '#') continue;
      const size_t sp = line.find(' ');
      const std::string key = line.substr(0, sp);
      const std::string val = sp == std::string::npos ? "" : line.substr(sp + 1);
      if (key == "case") {
        Case c;
        c.kind = kind;
        c.name = val;
        c.file = m.string() + ":" + std::to_string(lineno);
        cases.push_back(c);
        continue;
      }
      if (cases.empty() || cases.back().kind != kind) {
        bad("'" + key + "' before any 'case' line");
        continue;
      }
      Case& c = cases.back();
      if (key == "run") c.args = split_ws(val);
      else if (key == "exit") c.exit_code = std::atoi(val.c_str());
      else if (key == "error") c.error.push_back(val);
      else if (key == "stdout") c.stdout_re.push_back(val);
      else if (key == "absent") c.absent.push_back(val);
      else if (key == "allow") c.allow.push_back(val);
      else bad("unknown directive '" + key + "'");
    }
  }
  return cases;
}

std::string substitute(std::string s, const std::map<std::string, std::string>& vars) {
  for (const auto& [k, v] : vars)
    for (size_t p; (p = s.find(k)) != std::string::npos;) s.replace(p, k.size(), v);
  return s;
}

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Every path under the corpus with its size: a case that writes next to its inputs changes this.
std::map<std::string, uintmax_t> snapshot(const fs::path& root) {
  std::map<std::string, uintmax_t> out;
  for (const auto& e : fs::recursive_directory_iterator(root))
    out[e.path().string()] = e.is_regular_file() ? e.file_size() : 0;
  return out;
}

// Runs dpo with `args` in `cwd`; stdout and stderr go to the given files. Returns the exit code (128 + signal
// when killed).
int run_dpo(const std::vector<std::string>& args, const fs::path& cwd, const fs::path& cache, const fs::path& out,
            const fs::path& err) {
  const pid_t pid = fork();
  if (pid == 0) {
    if (chdir(cwd.c_str()) != 0) _exit(126);
    const int o = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0 || dup2(o, 1) < 0 || dup2(e, 2) < 0) _exit(126);
    setenv("XDG_CACHE_HOME", cache.c_str(), 1);  // the reference cache, inside the working folder
    setenv("OMP_NUM_THREADS", "1", 1);
    std::vector<char*> argv;
    const std::string bin = kDpo.string();
    argv.push_back(const_cast<char*>(bin.c_str()));
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  int st = 0;
  if (pid < 0 || waitpid(pid, &st, 0) != pid) return -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

// GoogleTest prints a failing parameter: its kind, name and manifest line, not the object's bytes.
void PrintTo(const Case& c, std::ostream* os) { *os << c.kind << "/" << c.name << " (" << c.file << ")"; }

class BadInput : public ::testing::TestWithParam<Case> {};

TEST_P(BadInput, ExitCodeMessageNoFileLeft) {
  const Case& c = GetParam();
  ASSERT_FALSE(c.args.empty()) << c.file << ": case '" << c.name << "' has no 'run' line";
  ASSERT_TRUE(fs::exists(kDpo)) << kDpo << " not built";
  const fs::path base = fs::temp_directory_path() / ("dpo_bad_inputs_" + std::to_string(getpid()));
  const fs::path scratch = base / (c.kind + "_" + c.name);
  const fs::path logs = base / (c.kind + "_" + c.name + ".logs");
  fs::remove_all(scratch);
  fs::remove_all(logs);
  fs::create_directories(scratch);
  fs::create_directories(logs);
  const std::map<std::string, std::string> vars = {{"{root}", kCorpus.string()},
                                                   {"{dir}", (kCorpus / c.kind).string()},
                                                   {"{out}", (scratch / "out").string()},
                                                   {"{scratch}", scratch.string()}};
  std::vector<std::string> args;
  std::string shown = "dpo";
  for (const auto& a : c.args) {
    args.push_back(substitute(a, vars));
    shown += " " + args.back();
  }
  const auto before = snapshot(kCorpus);
  const int rc = run_dpo(args, scratch, scratch / "cache", logs / "stdout", logs / "stderr");
  const std::string out = read_all(logs / "stdout"), err = read_all(logs / "stderr");
  SCOPED_TRACE(c.file + ": " + shown + "\nstderr: " + err + "stdout: " + out.substr(0, 2000));

  EXPECT_EQ(rc, c.exit_code);
  EXPECT_TRUE(c.exit_code == 0 || !c.error.empty()) << "a failing case needs an 'error' line";
  for (const auto& re : c.error)
    EXPECT_TRUE(std::regex_search(err, std::regex(substitute(re, vars)))) << "stderr does not match: " << re;
  for (const auto& re : c.stdout_re)
    EXPECT_TRUE(std::regex_search(out, std::regex(substitute(re, vars)))) << "stdout does not match: " << re;
  if (c.exit_code == 2) {  // an input error, never an internal error or a crash
    const bool usage = err.find("Run with --help") != std::string::npos;  // CLI11's parse errors
    EXPECT_TRUE(err.find("dpo: error") != std::string::npos || usage) << "expected 'dpo: error: ...'";
    EXPECT_EQ(err.find("internal error"), std::string::npos);
  }
  for (const auto& e : fs::directory_iterator(scratch)) {
    const std::string n = e.path().filename().string();
    EXPECT_NE(std::find(c.allow.begin(), c.allow.end(), n), c.allow.end()) << "left behind: " << e.path();
  }
  for (const auto& a : c.absent) EXPECT_FALSE(fs::exists(substitute(a, vars))) << "left behind: " << a;
  const auto after = snapshot(kCorpus);
  for (const auto& [p, size] : after)
    EXPECT_TRUE(before.count(p)) << "written into the corpus: " << p;
  EXPECT_EQ(before, after) << "the corpus changed";

  if (!HasFailure()) fs::remove_all(scratch), fs::remove_all(logs);
  std::error_code ec;
  fs::remove(base, ec);  // only when empty
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  std::string n = info.param.kind + "_" + info.param.name;
  for (char& ch : n)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return n;
}

INSTANTIATE_TEST_SUITE_P(Corpus, BadInput, ::testing::ValuesIn(load_cases()), case_name);

// The corpus is not empty and every kind the issue names is covered.
TEST(BadInputCorpus, EveryKindHasCases) {
  std::map<std::string, int> n;
  for (const Case& c : load_cases()) ++n[c.kind];
  for (const char* k : {"data", "config", "cli", "model"}) EXPECT_GE(n[k], 10) << k;
}

}  // namespace
