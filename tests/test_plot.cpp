// PNG charts: file format, sizes, degenerate data, atomic writes, errors.
// Set DPO_TEST_PLOT_DIR to keep the sample charts there for a look.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>

#include "runtime/error.h"
#include "train/plot.h"

namespace fs = std::filesystem;
using namespace dpo;

namespace {

fs::path fresh_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("dpo_plot_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

struct PngInfo {
  bool signature_ok = false;
  bool ihdr_ok = false;
  uint32_t width = 0, height = 0;
  uintmax_t size = 0;
};

PngInfo read_png_header(const fs::path& p) {
  PngInfo info;
  std::ifstream in(p, std::ios::binary);
  unsigned char b[24] = {};
  in.read(reinterpret_cast<char*>(b), sizeof b);
  if (in.gcount() != 24) return info;
  const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  info.signature_ok = std::equal(sig, sig + 8, b);
  // First chunk: length 13 (big-endian), type "IHDR", then width and height (big-endian).
  info.ihdr_ok = b[8] == 0 && b[9] == 0 && b[10] == 0 && b[11] == 13 && std::string(b + 12, b + 16) == "IHDR";
  auto be32 = [&](int o) {
    return (uint32_t(b[o]) << 24) | (uint32_t(b[o + 1]) << 16) | (uint32_t(b[o + 2]) << 8) | uint32_t(b[o + 3]);
  };
  info.width = be32(16);
  info.height = be32(20);
  info.size = fs::file_size(p);
  return info;
}

void expect_png(const fs::path& p, uint32_t w, uint32_t h) {
  ASSERT_TRUE(fs::exists(p)) << p;
  const PngInfo info = read_png_header(p);
  EXPECT_TRUE(info.signature_ok) << p;
  EXPECT_TRUE(info.ihdr_ok) << p;
  EXPECT_EQ(info.width, w) << p;
  EXPECT_EQ(info.height, h) << p;
}

size_t files_in(const fs::path& d) {
  return static_cast<size_t>(std::distance(fs::directory_iterator(d), fs::directory_iterator()));
}

// Where sample charts go: DPO_TEST_PLOT_DIR if set (kept), else the test's temporary directory.
fs::path sample_dir(const fs::path& fallback) {
  const char* keep = std::getenv("DPO_TEST_PLOT_DIR");
  if (!keep || !*keep) return fallback;
  fs::create_directories(keep);
  return keep;
}

Chart sample_chart() {
  Chart c;
  c.title = "DPO on the sentiment task";
  c.xlabel = "step";
  c.ylabel = "mean reward";
  Series a{"policy (train)", {}, {}, Series::Style::Line};
  Series b{"policy (eval)", {}, {}, Series::Style::LinePoints};
  Series s{"SFT baseline", {}, {}, Series::Style::Points};
  for (int i = 0; i <= 200; ++i) {
    a.x.push_back(i);
    a.y.push_back(1.6 * (1 - std::exp(-i / 50.0)) - 0.05 + 0.1 * std::sin(i * 0.7));
  }
  for (int i = 0; i <= 200; i += 25) {
    b.x.push_back(i);
    b.y.push_back(i == 100 ? std::nan("") : 1.5 * (1 - std::exp(-i / 60.0)));
    s.x.push_back(i);
    s.y.push_back(0.02 * ((i / 25) % 3) - 0.02);
  }
  c.series = {a, b, s};
  return c;
}

}  // namespace

TEST(Plot, WritesPngWithSignatureAndSize) {
  const fs::path dir = fresh_dir("basic");
  const fs::path out = sample_dir(dir);
  Chart c = sample_chart();
  write_png(c, (out / "sample.png").string());
  expect_png(out / "sample.png", 800, 500);
  EXPECT_GT(read_png_header(out / "sample.png").size, 5000u);  // lines, text: not a blank image
  c.width = 640;
  c.height = 360;
  write_png(c, (dir / "small.png").string());
  expect_png(dir / "small.png", 640, 360);
  // A blank chart compresses far better than one with curves and labels.
  Chart blank;
  blank.width = 640;
  blank.height = 360;
  write_png(blank, (dir / "blank.png").string());
  expect_png(dir / "blank.png", 640, 360);
  EXPECT_LT(read_png_header(dir / "blank.png").size, read_png_header(dir / "small.png").size);
  fs::remove_all(dir);
}

TEST(Plot, DegenerateDataDoesNotCrash) {
  const fs::path dir = fresh_dir("degenerate");
  const double nan = std::nan(""), inf = std::numeric_limits<double>::infinity();
  std::vector<Chart> cases;
  auto add = [&](std::vector<Series> s, bool log_x = false, bool log_y = false) {
    Chart c;
    c.title = "case " + std::to_string(cases.size());
    c.series = std::move(s);
    c.log_x = log_x;
    c.log_y = log_y;
    cases.push_back(c);
  };
  add({});                                                                   // no series
  add({Series{"empty", {}, {}}});                                            // empty series
  add({Series{"nan", {1, 2, 3}, {nan, nan, nan}}});                          // nothing drawable
  add({Series{"one", {3}, {7}}});                                            // single point
  add({Series{"one at 0", {0}, {0}, Series::Style::Points}});                // single point at the origin
  add({Series{"flat", {0, 1, 2, 3}, {0.5, 0.5, 0.5, 0.5}}});                 // all-equal y
  add({Series{"vertical", {2, 2, 2}, {1, 2, 3}}});                           // all-equal x
  add({Series{"gaps", {0, 1, 2, 3, 4}, {1, nan, 3, inf, 5}, Series::Style::LinePoints}});
  add({Series{"log x", {-1, 0, 1e-3, 10, 1e5}, {1, 2, 3, 4, 5}}}, true);     // non-positive x skipped on log
  add({Series{"log one", {100}, {1}}}, true, true);
  add({Series{"huge", {0, 1}, {-1e300, 1e300}}});
  add({Series{"tiny", {0, 1}, {1e-300, 2e-300}}});
  add({Series{"index x", {}, {3, 1, 4, 1, 5, 9, 2, 6}}});                    // x omitted: 0, 1, 2, ...
  add({Series{"", {0, 1}, {0, 1}}, Series{"", {0, 1}, {1, 0}}});             // no labels: no legend
  for (size_t i = 0; i < cases.size(); ++i) {
    const fs::path p = dir / ("case" + std::to_string(i) + ".png");
    ASSERT_NO_THROW(write_png(cases[i], p.string())) << cases[i].title;
    expect_png(p, 800, 500);
  }
  for (auto& c : cases) c.width = 400, c.height = 250;
  const fs::path grid = sample_dir(dir) / "degenerate.png";
  ASSERT_NO_THROW(write_png_grid(cases, 4, grid.string()));
  expect_png(grid, 1600, 1000);
  fs::remove_all(dir);
}

TEST(Plot, AtomicWriteLeavesNoTemporaryAndOverwrites) {
  const fs::path dir = fresh_dir("atomic");
  const fs::path p = dir / "chart.png";
  { std::ofstream(p) << "old contents"; }
  write_png(sample_chart(), p.string());
  expect_png(p, 800, 500);
  EXPECT_EQ(files_in(dir), 1u);
  write_png_grid({sample_chart(), sample_chart()}, 2, p.string());
  expect_png(p, 1600, 500);
  EXPECT_EQ(files_in(dir), 1u);
  fs::remove_all(dir);
}

TEST(Plot, UnwritablePathThrowsError) {
  const fs::path dir = fresh_dir("unwritable");
  EXPECT_THROW(write_png(sample_chart(), (dir / "missing" / "x.png").string()), Error);
  EXPECT_THROW(write_png_grid({sample_chart()}, 1, (dir / "missing" / "x.png").string()), Error);
  // The target is a directory: the temporary is written, the rename fails, and the temporary is removed.
  fs::create_directories(dir / "taken.png" / "inside");
  EXPECT_THROW(write_png(sample_chart(), (dir / "taken.png").string()), Error);
  EXPECT_EQ(files_in(dir), 1u);
  fs::remove_all(dir);
}

TEST(Plot, InvalidChartsThrowError) {
  const fs::path dir = fresh_dir("invalid");
  const std::string p = (dir / "x.png").string();
  Chart c;
  c.series = {Series{"mismatch", {1, 2, 3}, {1, 2}}};
  EXPECT_THROW(write_png(c, p), Error);
  Chart small;
  small.width = 10;
  EXPECT_THROW(write_png(small, p), Error);
  Chart huge;
  huge.height = 100000;
  EXPECT_THROW(write_png(huge, p), Error);
  EXPECT_THROW(write_png_grid({}, 2, p), Error);
  EXPECT_THROW(write_png_grid({Chart{}}, 0, p), Error);
  EXPECT_EQ(files_in(dir), 0u);
  fs::remove_all(dir);
}

TEST(Plot, GridLaysOutPanels) {
  const fs::path dir = fresh_dir("grid");
  const fs::path out = sample_dir(dir);
  std::vector<Chart> charts;
  for (int k = 0; k < 5; ++k) {
    Chart c = sample_chart();
    c.title = "panel " + std::to_string(k);
    c.width = 400;
    c.height = 300;
    if (k == 1) {
      c.log_x = true;
      c.series[0].x[0] = 0.5;  // x = 0 would be skipped on a log axis
      c.xlabel = "step (log)";
    }
    charts.push_back(c);
  }
  write_png_grid(charts, 2, (out / "grid.png").string());
  expect_png(out / "grid.png", 800, 900);  // 2 columns, 3 rows of 400 x 300
  charts[4].width = 500;                   // cells take the largest panel
  write_png_grid(charts, 3, (dir / "grid3.png").string());
  expect_png(dir / "grid3.png", 1500, 600);
  write_png_grid(charts, 10, (dir / "wide.png").string());  // more columns than charts: one row
  expect_png(dir / "wide.png", 2500, 300);
  fs::remove_all(dir);
}
