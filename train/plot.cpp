#include "train/plot.h"

#include <cairo.h>
#include <fontconfig/fontconfig.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numbers>

#include "runtime/error.h"

namespace dpo {

namespace {

constexpr int kMinSide = 100, kMaxSide = 8192, kMaxImageSide = 32767;  // cairo's image surface limit
constexpr int kMaxTicks = 40;

// The "tab10" palette.
constexpr std::array<std::array<double, 3>, 10> kPalette = {{{0.122, 0.467, 0.706},
                                                              {1.000, 0.498, 0.055},
                                                              {0.173, 0.627, 0.173},
                                                              {0.839, 0.153, 0.157},
                                                              {0.580, 0.404, 0.741},
                                                              {0.549, 0.337, 0.294},
                                                              {0.890, 0.467, 0.761},
                                                              {0.498, 0.498, 0.498},
                                                              {0.737, 0.741, 0.133},
                                                              {0.090, 0.745, 0.812}}};

struct SurfaceDeleter {
  void operator()(cairo_surface_t* s) const { cairo_surface_destroy(s); }
};
struct ContextDeleter {
  void operator()(cairo_t* c) const { cairo_destroy(c); }
};
using SurfacePtr = std::unique_ptr<cairo_surface_t, SurfaceDeleter>;
using ContextPtr = std::unique_ptr<cairo_t, ContextDeleter>;

// One axis: the data range mapped to pixels, and its ticks. On a log axis lo/hi/ticks are log10 values.
struct Axis {
  bool log = false;
  double lo = 0, hi = 1;
  std::vector<double> ticks;
  std::vector<std::string> labels;

  double transform(double v) const { return log ? std::log10(v) : v; }
  bool usable(double v) const { return std::isfinite(v) && (!log || v > 0); }
  // Fraction in [0, 1] along the axis for a (transformed) value.
  double frac(double t) const { return (t - lo) / (hi - lo); }
};

std::string format_tick(double v, double step, bool log_axis) {
  char buf[64];
  if (log_axis) {
    std::snprintf(buf, sizeof buf, "%g", std::pow(10.0, v));
    return buf;
  }
  if (std::fabs(v) < step * 1e-6) v = 0;  // no "-0" and no 1e-17 at the origin
  const int decimals = std::max(0, -static_cast<int>(std::floor(std::log10(step) + 1e-9)));
  const double mag = std::max(std::fabs(v), step);
  if (mag >= 1e6 || decimals > 5)
    std::snprintf(buf, sizeof buf, "%.3g", v);
  else
    std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

// Sets lo/hi/ticks/labels from the (transformed) data range [dlo, dhi]; has_data false means no points.
void make_axis(Axis& a, bool has_data, double dlo, double dhi) {
  if (!has_data) {
    dlo = a.log ? 0 : 0;
    dhi = 1;
  }
  if (a.log) {
    // Whole decades; at most ~8 labelled ticks.
    double lo = std::floor(dlo), hi = std::ceil(dhi);
    if (hi <= lo) lo -= 1, hi += 1;
    a.lo = lo;
    a.hi = hi;
    const double step = std::max(1.0, std::ceil((hi - lo) / 8.0));
    a.ticks.clear();
    for (double t = lo; t <= hi + 1e-9 && static_cast<int>(a.ticks.size()) < kMaxTicks; t += step) a.ticks.push_back(t);
    a.labels.clear();
    for (double t : a.ticks) a.labels.push_back(format_tick(t, step, true));
    return;
  }
  double span = dhi - dlo;
  const double scale = std::max(std::fabs(dlo), std::fabs(dhi));
  if (!(span > 1e-12 * scale) || !(span > 0)) {  // one point, all-equal values (or no spread at all)
    const double c = 0.5 * (dlo + dhi);
    const double d = c != 0 ? 0.1 * std::fabs(c) : 1.0;
    dlo = c - d;
    dhi = c + d;
  }
  if (!std::isfinite(dhi - dlo)) {  // values near the double range: halve, so the span is finite
    dlo *= 0.5;
    dhi *= 0.5;
  }
  span = dhi - dlo;
  const double raw = span / 5.0;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / mag;
  const double step = (f < 1.5 ? 1.0 : f < 3.0 ? 2.0 : f < 7.0 ? 5.0 : 10.0) * mag;
  a.lo = std::floor(dlo / step) * step;
  a.hi = std::ceil(dhi / step) * step;
  if (!(a.hi > a.lo)) a.hi = a.lo + step;
  a.ticks.clear();
  const int n = static_cast<int>(std::llround((a.hi - a.lo) / step));
  for (int i = 0; i <= n && i < kMaxTicks; ++i) a.ticks.push_back(a.lo + i * step);
  a.labels.clear();
  for (double t : a.ticks) a.labels.push_back(format_tick(t, step, false));
}

void set_font(cairo_t* cr, double size, bool bold) {
  cairo_select_font_face(cr, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL,
                         bold ? CAIRO_FONT_WEIGHT_BOLD : CAIRO_FONT_WEIGHT_NORMAL);
  cairo_set_font_size(cr, size);
}

double text_width(cairo_t* cr, const std::string& s) {
  cairo_text_extents_t e;
  cairo_text_extents(cr, s.c_str(), &e);
  return e.x_advance;
}

// Draws s with its anchor at (x, y): ax = 0 left, 0.5 centre, 1 right; ay likewise 0 top .. 1 bottom
// (vertical placement uses the font's ascent so labels line up).
void draw_text(cairo_t* cr, const std::string& s, double x, double y, double ax, double ay) {
  if (s.empty()) return;
  cairo_font_extents_t fe;
  cairo_font_extents(cr, &fe);
  const double w = text_width(cr, s);
  const double h = fe.ascent;
  cairo_move_to(cr, x - ax * w, y - ay * h + h);
  cairo_show_text(cr, s.c_str());
}

struct Point {
  double px, py;
  bool ok;  // drawable
};

void validate_chart(const Chart& c) {
  if (c.width < kMinSide || c.width > kMaxSide || c.height < kMinSide || c.height > kMaxSide)
    throw Error("chart '" + c.title + "': width and height must be in [" + std::to_string(kMinSide) + ", " +
                std::to_string(kMaxSide) + "] (got " + std::to_string(c.width) + " x " +
                std::to_string(c.height) + ")");
  for (const auto& s : c.series)
    if (!s.x.empty() && s.x.size() != s.y.size())
      throw Error("chart '" + c.title + "', series '" + s.label + "': x has " + std::to_string(s.x.size()) +
                  " values but y has " + std::to_string(s.y.size()));
}

double x_of(const Series& s, size_t i) { return s.x.empty() ? static_cast<double>(i) : s.x[i]; }

// Draws `chart` into the rectangle (0, 0, W, H) of the current user space.
void draw_chart(cairo_t* cr, const Chart& chart, double W, double H) {
  Axis ax, ay;
  ax.log = chart.log_x;
  ay.log = chart.log_y;

  // Data ranges over the drawable points.
  bool any = false;
  double xlo = 0, xhi = 0, ylo = 0, yhi = 0;
  for (const auto& s : chart.series)
    for (size_t i = 0; i < s.y.size(); ++i) {
      const double x = x_of(s, i), y = s.y[i];
      if (!ax.usable(x) || !ay.usable(y)) continue;
      const double tx = ax.transform(x), ty = ay.transform(y);
      if (!any) {
        xlo = xhi = tx;
        ylo = yhi = ty;
        any = true;
      } else {
        xlo = std::min(xlo, tx), xhi = std::max(xhi, tx);
        ylo = std::min(ylo, ty), yhi = std::max(yhi, ty);
      }
    }
  make_axis(ax, any, xlo, xhi);
  make_axis(ay, any, ylo, yhi);

  // Background.
  cairo_save(cr);
  cairo_rectangle(cr, 0, 0, W, H);
  cairo_set_source_rgb(cr, 1, 1, 1);
  cairo_fill(cr);

  // Margins: room for the title, the y tick labels and both axis labels.
  const double tick_font = 12, label_font = 13, title_font = 15;
  set_font(cr, tick_font, false);
  double ytick_w = 0;
  for (const auto& l : ay.labels) ytick_w = std::max(ytick_w, text_width(cr, l));
  const double left = 14 + (chart.ylabel.empty() ? 0 : label_font + 8) + ytick_w + 8;
  const double right = 20;
  const double top = chart.title.empty() ? 16 : title_font + 22;
  const double bottom = 14 + tick_font + 8 + (chart.xlabel.empty() ? 0 : label_font + 8);
  const double pl = left, pr = std::max(left + 10, W - right);
  const double pt = top, pb = std::max(top + 10, H - bottom);
  const double pw = pr - pl, ph = pb - pt;
  // Data map into the plot area inset by a few pixels, so points on the range's edge are not cut by the frame.
  const double inset = std::min(6.0, 0.05 * std::min(pw, ph));
  auto to_px = [&](double tx) { return pl + inset + ax.frac(tx) * (pw - 2 * inset); };
  auto to_py = [&](double ty) { return pb - inset - ay.frac(ty) * (ph - 2 * inset); };

  // Grid and ticks.
  cairo_set_line_width(cr, 1);
  cairo_set_source_rgb(cr, 0.90, 0.90, 0.90);
  for (double t : ax.ticks) {
    const double x = std::round(to_px(t)) + 0.5;
    cairo_move_to(cr, x, pt);
    cairo_line_to(cr, x, pb);
  }
  for (double t : ay.ticks) {
    const double y = std::round(to_py(t)) + 0.5;
    cairo_move_to(cr, pl, y);
    cairo_line_to(cr, pr, y);
  }
  cairo_stroke(cr);

  cairo_set_source_rgb(cr, 0.15, 0.15, 0.15);
  cairo_rectangle(cr, std::round(pl) + 0.5, std::round(pt) + 0.5, std::round(pw), std::round(ph));
  cairo_stroke(cr);
  for (double t : ax.ticks) {
    const double x = std::round(to_px(t)) + 0.5;
    cairo_move_to(cr, x, pb);
    cairo_line_to(cr, x, pb + 5);
  }
  for (double t : ay.ticks) {
    const double y = std::round(to_py(t)) + 0.5;
    cairo_move_to(cr, pl - 5, y);
    cairo_line_to(cr, pl, y);
  }
  cairo_stroke(cr);

  set_font(cr, tick_font, false);
  for (size_t i = 0; i < ax.ticks.size(); ++i) draw_text(cr, ax.labels[i], to_px(ax.ticks[i]), pb + 8, 0.5, 0);
  for (size_t i = 0; i < ay.ticks.size(); ++i) draw_text(cr, ay.labels[i], pl - 8, to_py(ay.ticks[i]), 1, 0.5);

  // Title and axis labels.
  set_font(cr, title_font, true);
  draw_text(cr, chart.title, pl + pw / 2, 10, 0.5, 0);
  set_font(cr, label_font, false);
  draw_text(cr, chart.xlabel, pl + pw / 2, pb + 8 + tick_font + 8, 0.5, 0);
  if (!chart.ylabel.empty()) {
    cairo_save(cr);
    cairo_translate(cr, 12, pt + ph / 2);
    cairo_rotate(cr, -std::numbers::pi / 2);
    draw_text(cr, chart.ylabel, 0, 0, 0.5, 0);
    cairo_restore(cr);
  }

  // Series, clipped to the plot area.
  std::vector<std::vector<Point>> points(chart.series.size());
  for (size_t k = 0; k < chart.series.size(); ++k) {
    const Series& s = chart.series[k];
    for (size_t i = 0; i < s.y.size(); ++i) {
      const double x = x_of(s, i), y = s.y[i];
      const bool ok = ax.usable(x) && ay.usable(y);
      points[k].push_back(ok ? Point{to_px(ax.transform(x)), to_py(ay.transform(y)), true} : Point{0, 0, false});
    }
  }
  cairo_save(cr);
  cairo_rectangle(cr, pl, pt, pw, ph);
  cairo_clip(cr);
  cairo_set_line_join(cr, CAIRO_LINE_JOIN_ROUND);
  cairo_set_line_cap(cr, CAIRO_LINE_CAP_ROUND);
  for (size_t k = 0; k < chart.series.size(); ++k) {
    const auto& col = kPalette[k % kPalette.size()];
    const Series::Style style = chart.series[k].style;
    cairo_set_source_rgb(cr, col[0], col[1], col[2]);
    if (style != Series::Style::Points) {
      cairo_set_line_width(cr, 2);
      bool pen = false;
      for (const Point& p : points[k]) {
        if (!p.ok) {
          pen = false;
          continue;
        }
        if (pen)
          cairo_line_to(cr, p.px, p.py);
        else
          cairo_move_to(cr, p.px, p.py);
        pen = true;
      }
      cairo_stroke(cr);
    }
    // Points; a lone point of a Line series (no neighbour to join) is drawn as a dot so it is not lost.
    for (size_t i = 0; i < points[k].size(); ++i) {
      const Point& p = points[k][i];
      if (!p.ok) continue;
      const bool lone = (i == 0 || !points[k][i - 1].ok) && (i + 1 == points[k].size() || !points[k][i + 1].ok);
      if (style == Series::Style::Line && !lone) continue;
      cairo_new_sub_path(cr);
      cairo_arc(cr, p.px, p.py, style == Series::Style::Line ? 2.5 : 3.5, 0, 2 * std::numbers::pi);
    }
    cairo_fill(cr);
  }
  cairo_restore(cr);

  // Legend: the labelled series, in the corner of the plot area that covers the fewest points.
  std::vector<size_t> entries;
  for (size_t k = 0; k < chart.series.size(); ++k)
    if (!chart.series[k].label.empty()) entries.push_back(k);
  if (!entries.empty()) {
    set_font(cr, tick_font, false);
    double lw = 0;
    for (size_t k : entries) lw = std::max(lw, text_width(cr, chart.series[k].label));
    const double row = tick_font + 6, sample = 22, pad = 6;
    const double bw = pad + sample + 6 + lw + pad, bh = pad + row * entries.size() + pad - 4;
    const std::array<std::array<double, 2>, 4> corners = {{{pr - 8 - bw, pt + 8},
                                                           {pl + 8, pt + 8},
                                                           {pr - 8 - bw, pb - 8 - bh},
                                                           {pl + 8, pb - 8 - bh}}};
    // What each corner would hide: markers, and the drawn lines sampled every few pixels. Ties keep the
    // earlier corner (top right, top left, bottom right, bottom left).
    std::array<long, 4> hidden{};
    auto mark = [&](double x, double y) {
      for (size_t c = 0; c < corners.size(); ++c)
        hidden[c] += x >= corners[c][0] - 4 && x <= corners[c][0] + bw + 4 && y >= corners[c][1] - 4 &&
                     y <= corners[c][1] + bh + 4;
    };
    for (size_t k = 0; k < points.size(); ++k) {
      const bool lines = chart.series[k].style != Series::Style::Points;
      for (size_t i = 0; i < points[k].size(); ++i) {
        const Point& p = points[k][i];
        if (!p.ok) continue;
        mark(p.px, p.py);
        if (!lines || i == 0 || !points[k][i - 1].ok) continue;
        const Point& q = points[k][i - 1];
        const double len = std::hypot(p.px - q.px, p.py - q.py);
        const int n = static_cast<int>(std::min(400.0, std::ceil(len / 4.0)));
        for (int j = 1; j < n; ++j) mark(q.px + (p.px - q.px) * j / n, q.py + (p.py - q.py) * j / n);
      }
    }
    const size_t best = static_cast<size_t>(std::min_element(hidden.begin(), hidden.end()) - hidden.begin());
    const double bx = corners[best][0], by = corners[best][1];
    cairo_rectangle(cr, bx, by, bw, bh);
    cairo_set_source_rgba(cr, 1, 1, 1, 0.88);
    cairo_fill_preserve(cr);
    cairo_set_source_rgb(cr, 0.75, 0.75, 0.75);
    cairo_set_line_width(cr, 1);
    cairo_stroke(cr);
    for (size_t e = 0; e < entries.size(); ++e) {
      const size_t k = entries[e];
      const auto& col = kPalette[k % kPalette.size()];
      const double cy = by + pad + row * e + row / 2 - 2;
      cairo_set_source_rgb(cr, col[0], col[1], col[2]);
      const Series::Style style = chart.series[k].style;
      if (style != Series::Style::Points) {
        cairo_set_line_width(cr, 2);
        cairo_move_to(cr, bx + pad, cy);
        cairo_line_to(cr, bx + pad + sample, cy);
        cairo_stroke(cr);
      }
      if (style != Series::Style::Line) {
        cairo_arc(cr, bx + pad + sample / 2, cy, 3.5, 0, 2 * std::numbers::pi);
        cairo_fill(cr);
      }
      cairo_set_source_rgb(cr, 0.1, 0.1, 0.1);
      draw_text(cr, chart.series[k].label, bx + pad + sample + 6, cy, 0, 0.5);
    }
  }
  cairo_restore(cr);
}

void check_cairo(cairo_status_t st, const std::string& what) {
  if (st != CAIRO_STATUS_SUCCESS) throw Error(what + ": cairo: " + cairo_status_to_string(st));
}

// Text goes through cairo's toy font API, which loads fontconfig's configuration and caches font faces for the
// life of the process. Release both at exit so leak checkers (LeakSanitizer in tools/test.sh) see no leak;
// by then no cairo object of ours is alive.
void release_font_caches_at_exit() {
  static std::once_flag once;
  std::call_once(once, [] {
    std::atexit([] {
      cairo_debug_reset_static_data();
      FcFini();
    });
  });
}

// Renders with `draw` onto a W x H surface and writes it to path atomically.
template <class Draw>
void render_png(int W, int H, const std::string& path, Draw draw) {
  release_font_caches_at_exit();
  SurfacePtr surface(cairo_image_surface_create(CAIRO_FORMAT_RGB24, W, H));
  check_cairo(cairo_surface_status(surface.get()), "creating a " + std::to_string(W) + "x" + std::to_string(H) +
                                                       " image for " + path);
  {
    ContextPtr cr(cairo_create(surface.get()));
    check_cairo(cairo_status(cr.get()), "drawing " + path);
    draw(cr.get());
    check_cairo(cairo_status(cr.get()), "drawing " + path);
  }
  cairo_surface_flush(surface.get());
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const cairo_status_t st = cairo_surface_write_to_png(surface.get(), tmp.c_str());
  if (st != CAIRO_STATUS_SUCCESS) {
    std::remove(tmp.c_str());
    throw Error("writing " + path + " failed: cairo: " + cairo_status_to_string(st));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    throw Error("renaming " + tmp + " to " + path + " failed: " + std::strerror(e));
  }
}

}  // namespace

void write_png(const Chart& chart, const std::string& path) {
  validate_chart(chart);
  render_png(chart.width, chart.height, path,
             [&](cairo_t* cr) { draw_chart(cr, chart, chart.width, chart.height); });
}

void write_png_grid(const std::vector<Chart>& charts, int cols, const std::string& path) {
  if (charts.empty()) throw Error("writing " + path + ": no charts to draw");
  if (cols < 1) throw Error("writing " + path + ": cols must be >= 1 (got " + std::to_string(cols) + ")");
  int cw = 0, ch = 0;
  for (const auto& c : charts) {
    validate_chart(c);
    cw = std::max(cw, c.width);
    ch = std::max(ch, c.height);
  }
  const int n = static_cast<int>(charts.size());
  const int ncols = std::min(cols, n);
  const int nrows = (n + ncols - 1) / ncols;
  if (static_cast<int64_t>(cw) * ncols > kMaxImageSide || static_cast<int64_t>(ch) * nrows > kMaxImageSide)
    throw Error("writing " + path + ": a " + std::to_string(ncols) + "x" + std::to_string(nrows) +
                " grid of " + std::to_string(cw) + "x" + std::to_string(ch) + " panels exceeds " +
                std::to_string(kMaxImageSide) + " pixels a side");
  render_png(cw * ncols, ch * nrows, path, [&](cairo_t* cr) {
    cairo_set_source_rgb(cr, 1, 1, 1);
    cairo_paint(cr);
    for (int i = 0; i < n; ++i) {
      cairo_save(cr);
      cairo_translate(cr, (i % ncols) * cw, (i / ncols) * ch);
      cairo_rectangle(cr, 0, 0, cw, ch);
      cairo_clip(cr);
      draw_chart(cr, charts[i], cw, ch);
      cairo_restore(cr);
    }
  });
}

}  // namespace dpo
