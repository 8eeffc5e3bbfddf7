// The closed forms and tabular gradients of `dpo repro` (train/repro.h).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "runtime/error.h"
#include "train/repro.h"

namespace dpo {

namespace {

void check_pairs(int64_t n_items, const std::vector<WeightedPair>& pairs) {
  for (const WeightedPair& q : pairs) {
    DPO_ASSERT(q.chosen >= 0 && q.chosen < n_items && q.rejected >= 0 && q.rejected < n_items &&
                   q.chosen != q.rejected,
               "pair items out of range or equal");
    DPO_ASSERT(std::isfinite(q.weight) && q.weight > 0, "pair weight must be finite and > 0");
  }
}

// Solves A x = b (n x n, row-major, overwritten) by Gaussian elimination with partial pivoting, in double. A is
// symmetric positive definite wherever it is used here (a Laplacian plus the rank-one term that pins the constant),
// so pivoting is only a safeguard.
std::vector<double> solve_dense(std::vector<double> A, std::vector<double> b, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    int64_t piv = k;
    for (int64_t i = k + 1; i < n; ++i)
      if (std::fabs(A[i * n + k]) > std::fabs(A[piv * n + k])) piv = i;
    DPO_ASSERT(A[piv * n + k] != 0.0, "singular system in a repro closed form");
    if (piv != k) {
      for (int64_t j = 0; j < n; ++j) std::swap(A[k * n + j], A[piv * n + j]);
      std::swap(b[k], b[piv]);
    }
    for (int64_t i = k + 1; i < n; ++i) {
      const double f = A[i * n + k] / A[k * n + k];
      if (f == 0.0) continue;
      for (int64_t j = k; j < n; ++j) A[i * n + j] -= f * A[k * n + j];
      b[i] -= f * b[k];
    }
  }
  std::vector<double> x(n);
  for (int64_t i = n - 1; i >= 0; --i) {
    double s = b[i];
    for (int64_t j = i + 1; j < n; ++j) s -= A[i * n + j] * x[j];
    x[i] = s / A[i * n + i];
  }
  return x;
}

// Connected components of the undirected pair graph: comp[i] = component id, -1 for items in no pair.
std::vector<int64_t> components(int64_t n, const std::vector<WeightedPair>& pairs, int64_t* n_comp) {
  std::vector<int64_t> parent(n);
  std::iota(parent.begin(), parent.end(), 0);
  auto find = [&](int64_t x) {
    while (parent[x] != x) x = parent[x] = parent[parent[x]];
    return x;
  };
  std::vector<char> used(n, 0);
  for (const WeightedPair& q : pairs) {
    used[q.chosen] = used[q.rejected] = 1;
    parent[find(q.chosen)] = find(q.rejected);
  }
  std::vector<int64_t> comp(n, -1), id(n, -1);
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!used[i]) continue;
    const int64_t r = find(i);
    if (id[r] < 0) id[r] = c++;
    comp[i] = id[r];
  }
  *n_comp = c;
  return comp;
}

// Solves L x = b for a weighted Laplacian L (n x n) whose null space is spanned by the components' indicator
// vectors, with b summing to 0 on each component: adds the indicator outer products (which pins each component's
// mean to 0 and makes the matrix positive definite) and solves; items in no pair get 0.
std::vector<double> solve_laplacian(std::vector<double> L, const std::vector<double>& b, int64_t n,
                                    const std::vector<int64_t>& comp) {
  std::vector<double> A = std::move(L), rhs = b;
  for (int64_t i = 0; i < n; ++i) {
    if (comp[i] < 0) {
      A[i * n + i] = 1.0;  // an isolated item: x = 0
      rhs[i] = 0.0;
      continue;
    }
    for (int64_t j = 0; j < n; ++j)
      if (comp[j] == comp[i]) A[i * n + j] += 1.0;
  }
  return solve_dense(std::move(A), std::move(rhs), n);
}

void laplacian_add(std::vector<double>& L, int64_t n, int64_t a, int64_t b, double w) {
  L[a * n + a] += w;
  L[b * n + b] += w;
  L[a * n + b] -= w;
  L[b * n + a] -= w;
}

// Reachability from `start` over the directed edges of adjacency matrix adj (n x n, adj[i*n+j]: edge i -> j).
std::vector<char> reach(const std::vector<char>& adj, int64_t n, int64_t start) {
  std::vector<char> seen(n, 0);
  std::vector<int64_t> stack = {start};
  seen[start] = 1;
  while (!stack.empty()) {
    const int64_t i = stack.back();
    stack.pop_back();
    for (int64_t j = 0; j < n; ++j)
      if (adj[i * n + j] && !seen[j]) {
        seen[j] = 1;
        stack.push_back(j);
      }
  }
  return seen;
}

double bt_loglik(const std::vector<WeightedPair>& pairs, const std::vector<double>& s) {
  double ll = 0;
  for (const WeightedPair& q : pairs) ll -= q.weight * pair_math::softplus(-(s[q.chosen] - s[q.rejected]));
  return ll;
}

}  // namespace

std::vector<double> log_softmax(const std::vector<double>& logits) {
  DPO_ASSERT(!logits.empty(), "log_softmax of nothing");
  const double m = *std::max_element(logits.begin(), logits.end());
  double s = 0;
  for (double x : logits) s += std::exp(x - m);
  const double lse = m + std::log(s);
  std::vector<double> out(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) out[i] = logits[i] - lse;
  return out;
}

void log_softmax_backward(const std::vector<double>& logp, const std::vector<double>& dlogp,
                          std::vector<double>& dlogits) {
  DPO_ASSERT(logp.size() == dlogp.size() && logp.size() == dlogits.size(), "log_softmax_backward: size mismatch");
  const double total = std::accumulate(dlogp.begin(), dlogp.end(), 0.0);
  for (size_t j = 0; j < logp.size(); ++j) dlogits[j] += dlogp[j] - std::exp(logp[j]) * total;
}

double pair_objective(const PairLossParams& params, const std::vector<WeightedPair>& pairs,
                      const std::vector<double>& logits, const std::vector<double>& ref_logp,
                      std::vector<double>* grad) {
  const int64_t n = static_cast<int64_t>(logits.size());
  DPO_ASSERT(ref_logp.size() == logits.size(), "pair_objective: logits and ref_logp sizes differ");
  check_pairs(n, pairs);
  const std::vector<double> logp = log_softmax(logits);
  std::vector<double> dlogp(logits.size(), 0.0);
  double loss = 0;
  for (const WeightedPair& q : pairs) {
    PairLossInput in;
    in.policy_chosen = logp[q.chosen];
    in.policy_rejected = logp[q.rejected];
    in.ref_chosen = ref_logp[q.chosen];
    in.ref_rejected = ref_logp[q.rejected];
    in.len_chosen = in.len_rejected = 1;  // one item is one completion token
    const PairLossOutput o = pair_loss_eval(params, in);
    loss += q.weight * o.loss;
    dlogp[q.chosen] += q.weight * o.d_chosen;
    dlogp[q.rejected] += q.weight * o.d_rejected;
  }
  if (grad) {
    grad->assign(logits.size(), 0.0);
    log_softmax_backward(logp, dlogp, *grad);
  }
  return loss;
}

std::vector<double> least_squares_margins(int64_t n, const std::vector<WeightedPair>& pairs, double target) {
  check_pairs(n, pairs);
  int64_t n_comp = 0;
  const std::vector<int64_t> comp = components(n, pairs, &n_comp);
  // d/dh of sum w (h_c - h_r - t)^2 = 0  <=>  L h = b, L = sum w (e_c - e_r)(e_c - e_r)^T, b = sum w t (e_c - e_r).
  std::vector<double> L(static_cast<size_t>(n * n), 0.0), b(n, 0.0);
  for (const WeightedPair& q : pairs) {
    laplacian_add(L, n, q.chosen, q.rejected, q.weight);
    b[q.chosen] += q.weight * target;
    b[q.rejected] -= q.weight * target;
  }
  return solve_laplacian(std::move(L), b, n, comp);
}

BradleyTerryFit bradley_terry_fit(int64_t n, const std::vector<WeightedPair>& pairs) {
  check_pairs(n, pairs);
  BradleyTerryFit fit;
  fit.score.assign(n, 0.0);
  int64_t n_comp = 0;
  const std::vector<int64_t> comp = components(n, pairs, &n_comp);
  // Existence: within each component, every item reaches every other along rejected -> chosen edges.
  std::vector<char> adj(static_cast<size_t>(n * n), 0), radj(static_cast<size_t>(n * n), 0);
  for (const WeightedPair& q : pairs) {
    adj[q.rejected * n + q.chosen] = 1;
    radj[q.chosen * n + q.rejected] = 1;
  }
  fit.exists = true;
  std::vector<char> checked(n_comp, 0);
  for (int64_t i = 0; i < n && fit.exists; ++i) {
    if (comp[i] < 0 || checked[comp[i]]) continue;
    checked[comp[i]] = 1;
    const std::vector<char> fwd = reach(adj, n, i), bwd = reach(radj, n, i);
    for (int64_t j = 0; j < n; ++j)
      if (comp[j] == comp[i] && (!fwd[j] || !bwd[j])) fit.exists = false;
  }
  if (!fit.exists) return fit;

  // Newton ascent with backtracking. Gradient g_i = sum over pairs of w sigmoid(-(s_c - s_r)) (+1 for the chosen
  // item, -1 for the rejected); negative Hessian = sum w s(z) s(-z) (e_c - e_r)(e_c - e_r)^T, a weighted Laplacian.
  // Stopping: Newton converges quadratically, so once max |g| is below 1e-10 of the total weight one more step takes
  // it to the rounding floor of the gradient's sums (about 1e-16 of the total weight per term); then stop.
  std::vector<double>& s = fit.score;
  double total_w = 0;
  for (const WeightedPair& q : pairs) total_w += q.weight;
  bool polish = false;
  for (int it = 0; it < 200; ++it) {
    std::vector<double> g(n, 0.0), H(static_cast<size_t>(n * n), 0.0);
    for (const WeightedPair& q : pairs) {
      const double z = s[q.chosen] - s[q.rejected];
      const double sm = pair_math::sigmoid(-z);
      g[q.chosen] += q.weight * sm;
      g[q.rejected] -= q.weight * sm;
      laplacian_add(H, n, q.chosen, q.rejected, q.weight * sm * pair_math::sigmoid(z));
    }
    fit.grad_max = 0;
    for (double v : g) fit.grad_max = std::max(fit.grad_max, std::fabs(v));
    if (polish || fit.grad_max == 0) break;
    polish = fit.grad_max < 1e-10 * total_w;
    const std::vector<double> step = solve_laplacian(std::move(H), g, n, comp);
    const double ll0 = bt_loglik(pairs, s);
    double t = 1.0;
    std::vector<double> trial(n);
    for (int k = 0; k < 60; ++k, t *= 0.5) {
      for (int64_t i = 0; i < n; ++i) trial[i] = s[i] + t * step[i];
      if (bt_loglik(pairs, trial) >= ll0) break;
    }
    s = trial;
    fit.iterations = it + 1;
  }
  // Each component's mean to 0 (the likelihood sees differences only; the Newton steps keep it at 0 already).
  std::vector<double> sum(n_comp, 0.0), cnt(n_comp, 0.0);
  for (int64_t i = 0; i < n; ++i)
    if (comp[i] >= 0) sum[comp[i]] += s[i], cnt[comp[i]] += 1;
  for (int64_t i = 0; i < n; ++i)
    if (comp[i] >= 0) s[i] -= sum[comp[i]] / cnt[comp[i]];
  return fit;
}

double total_variation(const std::vector<double>& p, const std::vector<double>& q) {
  DPO_ASSERT(p.size() == q.size(), "total_variation: sizes differ");
  double s = 0;
  for (size_t i = 0; i < p.size(); ++i) s += std::fabs(p[i] - q[i]);
  return 0.5 * s;
}

double kl_divergence(const std::vector<double>& p, const std::vector<double>& q) {
  DPO_ASSERT(p.size() == q.size(), "kl_divergence: sizes differ");
  double s = 0;
  for (size_t i = 0; i < p.size(); ++i)
    if (p[i] > 0) s += p[i] * std::log(p[i] / q[i]);
  return s;
}

std::vector<double> best_of_n_distribution(const std::vector<double>& prob, const std::vector<double>& reward,
                                           int64_t n) {
  DPO_ASSERT(n >= 1, "best_of_n_distribution: N must be >= 1");
  DPO_ASSERT(prob.size() == reward.size(), "best_of_n_distribution: prob and reward sizes differ");
  double total = 0;
  for (double q : prob) {
    DPO_ASSERT(std::isfinite(q) && q >= 0, "best_of_n_distribution: probabilities must be finite and >= 0");
    total += q;
  }
  DPO_ASSERT(std::fabs(total - 1) <= 1e-9, "best_of_n_distribution: probabilities must sum to 1");
  for (double r : reward) DPO_ASSERT(std::isfinite(r), "best_of_n_distribution: rewards must be finite");
  // Items by increasing reward; each run of equal rewards is one value v with mass p(v) and F(v) = mass up to it.
  std::vector<size_t> order(prob.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return reward[a] < reward[b]; });
  std::vector<double> out(prob.size(), 0.0);
  double below = 0;  // F(v-)
  for (size_t i = 0; i < order.size();) {
    size_t j = i;
    double pv = 0;
    while (j < order.size() && reward[order[j]] == reward[order[i]]) pv += prob[order[j++]];
    // F(v) of the last value is 1 up to rounding: clamp so that the masses P(max = v) sum to exactly 1 - 0^N.
    const double fv = j == order.size() ? 1.0 : std::min(1.0, below + pv);
    const double pmax = std::pow(fv, static_cast<double>(n)) - std::pow(below, static_cast<double>(n));
    if (pv > 0)
      for (size_t k = i; k < j; ++k) out[order[k]] = prob[order[k]] * (pmax / pv);
    below = fv;
    i = j;
  }
  return out;
}

double best_of_n_kl_bound(int64_t n) {
  DPO_ASSERT(n >= 1, "best_of_n_kl_bound: N must be >= 1");
  const double N = static_cast<double>(n);
  return std::log(N) - (N - 1) / N;
}

// ---- Student's t ------------------------------------------------------------------------------------------------

namespace {

// The continued fraction of the incomplete beta function, evaluated by the modified Lentz method (Press et al.,
// Numerical Recipes, section 6.4, for the form; converges quickly for x < (a + 1) / (a + b + 2)).
double beta_continued_fraction(double a, double b, double x) {
  constexpr double kTiny = 1e-300;
  auto guard = [](double v) { return std::fabs(v) < kTiny ? kTiny : v; };
  double c = 1.0, d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0)), h = d;
  for (int m = 1; m <= 1000; ++m) {
    const double m2 = 2.0 * m;
    double t = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2));  // even term
    d = 1.0 / guard(1.0 + t * d);
    c = guard(1.0 + t / c);
    h *= d * c;
    t = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0));  // odd term
    d = 1.0 / guard(1.0 + t * d);
    c = guard(1.0 + t / c);
    const double step = d * c;
    h *= step;
    if (std::fabs(step - 1.0) < 1e-15) break;
  }
  return h;
}

double sample_variance(const std::vector<double>& v, double mean) {
  double s = 0;
  for (double x : v) s += (x - mean) * (x - mean);
  return s / static_cast<double>(v.size() - 1);
}

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

// The test's p-value and interval from the mean difference, its standard error and the degrees of freedom.
TTest finish_t_test(double diff, double se, double df) {
  TTest r;
  r.diff = diff;
  r.se = se;
  r.df = df;
  if (se > 0) {
    r.t = diff / se;
    r.p_two_sided = 2.0 * (1.0 - student_t_cdf(std::fabs(r.t), df));
  } else {  // no spread: the difference is exact
    r.t = diff == 0 ? 0.0 : std::copysign(INFINITY, diff);
    r.p_two_sided = diff == 0 ? 1.0 : 0.0;
  }
  const double q = student_t_quantile(0.975, df);
  r.ci95_lo = diff - q * se;
  r.ci95_hi = diff + q * se;
  return r;
}

}  // namespace

double incomplete_beta(double a, double b, double x) {
  DPO_ASSERT(a > 0 && b > 0 && std::isfinite(a) && std::isfinite(b), "incomplete_beta: a and b must be > 0");
  DPO_ASSERT(x >= 0 && x <= 1, "incomplete_beta: x must be in [0, 1]");
  if (x == 0 || x == 1) return x;
  const double log_front =
      std::lgamma(a + b) - std::lgamma(a) - std::lgamma(b) + a * std::log(x) + b * std::log1p(-x);
  // The fraction converges fast below the mean of the Beta(a, b) distribution; above it use I_x(a, b) =
  // 1 - I_{1-x}(b, a).
  if (x < (a + 1.0) / (a + b + 2.0)) return std::exp(log_front) * beta_continued_fraction(a, b, x) / a;
  return 1.0 - std::exp(log_front) * beta_continued_fraction(b, a, 1.0 - x) / b;
}

double student_t_cdf(double t, double df) {
  DPO_ASSERT(df > 0 && std::isfinite(df), "student_t_cdf: degrees of freedom must be > 0");
  if (std::isnan(t)) return NAN;
  if (std::isinf(t)) return t > 0 ? 1.0 : 0.0;
  // P(|T| > |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2).
  const double tail = 0.5 * incomplete_beta(0.5 * df, 0.5, df / (df + t * t));
  return t >= 0 ? 1.0 - tail : tail;
}

double student_t_quantile(double p, double df) {
  DPO_ASSERT(p > 0 && p < 1, "student_t_quantile: p must be in (0, 1)");
  if (p < 0.5) return -student_t_quantile(1.0 - p, df);
  double lo = 0, hi = 1;
  while (student_t_cdf(hi, df) < p) hi *= 2;  // df >= 1 reaches any p < 1 - 1e-12 within a few doublings
  for (int i = 0; i < 200 && hi - lo > 1e-12 * std::max(1.0, hi); ++i) {
    const double mid = 0.5 * (lo + hi);
    (student_t_cdf(mid, df) < p ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

TTest paired_t_test(const std::vector<double>& a, const std::vector<double>& b) {
  DPO_ASSERT(a.size() == b.size() && a.size() >= 2, "paired_t_test: two samples of equal size >= 2");
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  const double m = mean_of(d), n = static_cast<double>(d.size());
  return finish_t_test(m, std::sqrt(sample_variance(d, m) / n), n - 1);
}

TTest welch_t_test(const std::vector<double>& a, const std::vector<double>& b) {
  DPO_ASSERT(a.size() >= 2 && b.size() >= 2, "welch_t_test: each sample needs >= 2 values");
  const double ma = mean_of(a), mb = mean_of(b), na = static_cast<double>(a.size()), nb = static_cast<double>(b.size());
  const double va = sample_variance(a, ma) / na, vb = sample_variance(b, mb) / nb;
  // Welch-Satterthwaite degrees of freedom; with both variances 0 the difference is exact (finish_t_test).
  const double df = va + vb > 0 ? (va + vb) * (va + vb) / (va * va / (na - 1) + vb * vb / (nb - 1)) : na + nb - 2;
  return finish_t_test(ma - mb, std::sqrt(va + vb), df);
}

}  // namespace dpo
