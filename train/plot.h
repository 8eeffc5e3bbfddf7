// PNG charts (line / scatter) drawn with cairo, for the training curves and the demo's reward plots.
//
// A chart has a title, axis labels, "nice" ticks (1, 2, 5 x 10^k on a linear axis; powers of ten on a log
// axis) with tick labels and light grid lines, one color per series (a 10-color palette, cycled), and a legend
// of the labelled series placed in the corner of the plot area that hides the fewest points.
//
// Data rules: a point whose x or y is not finite (NaN, +-inf), or whose x (y) is <= 0 on a log x (y) axis, is
// skipped; a line is broken at a skipped point rather than drawn across it. An empty Series::x means
// x = 0, 1, 2, ...; otherwise x and y must have the same length (dpo::Error if not). A chart with no drawable
// point gets the range [0, 1]; a degenerate range (one point, all-equal values) is widened around its value
// (by 10% of it, or by 1 around 0; by a decade on a log axis), so nothing divides by zero.
#pragma once

#include <string>
#include <vector>

namespace dpo {

struct Series {
  enum class Style { Line, Points, LinePoints };
  std::string label;  // empty: not in the legend
  std::vector<double> x, y;
  Style style = Style::Line;
};

struct Chart {
  std::string title, xlabel, ylabel;
  std::vector<Series> series;
  int width = 800, height = 500;  // pixels; each must be in [100, 8192]
  bool log_x = false;
  bool log_y = false;
};

// Writes one chart as a PNG of width x height pixels. Atomic: drawn to path + ".tmp.<pid>", then renamed over
// path; on any failure (bad sizes, mismatched x/y, unwritable path) the temporary is removed and dpo::Error is
// thrown naming the file.
void write_png(const Chart& chart, const std::string& path);

// Several charts in one PNG: a grid of min(cols, n) columns (cols >= 1) and ceil(n / columns) rows, charts in
// row-major order, every cell the largest width x height among the charts; empty cells stay white. The whole
// image must fit cairo's 32767 pixels a side. Same atomicity and errors as write_png;
// an empty `charts` throws dpo::Error.
void write_png_grid(const std::vector<Chart>& charts, int cols, const std::string& path);

}  // namespace dpo
