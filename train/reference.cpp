#include "train/reference.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "model/checkpoint.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"
#include "train/hash.h"

namespace dpo {

Batch BatchShape::make(const std::vector<PreferencePair>& data, const std::vector<int64_t>& indices,
                       DType weight_dtype) const {
  Batch b = make_layout_batch(data, indices, layout, max_tokens_per_row, weight_dtype, pad_id);
  apply_ld_alpha(b, ld_alpha);
  return b;
}

LayoutScope::LayoutScope(GPT2& m, const Batch& b) {
  if (b.layout == BatchLayout::Padded) return;
  GPT2::Layout l;
  l.pos = to_backend(m.backend(), b.pos);
  l.span = to_backend(m.backend(), b.span);
  l.seg = b.seg;
  l.row_pairs = b.row_pairs;
  m.set_layout(&l);
  m_ = &m;
}

LayoutScope::~LayoutScope() {
  if (m_) m_->set_layout(nullptr);
}

std::vector<double> sequence_logps(GPT2& m, const Batch& b) {
  Backend& be = m.backend();
  const LayoutScope scope(m, b);
  Tensor seq = be.empty({b.layout == BatchLayout::Padded ? b.tokens.size(0) : 2 * b.pairs}, grad_dtype(m.dtype()));
  m.score(to_backend(be, b.tokens), to_backend(be, b.keymask), to_backend(be, b.targets), to_backend(be, b.weights),
          seq, Tensor(), b.weights);
  std::vector<double> lp = to_host_f64(be, seq);
  if (b.layout == BatchLayout::Padded) return lp;
  // A layout batch's sequences are interleaved (chosen 2q, rejected 2q + 1): back to [chosen..., rejected...].
  std::vector<double> out(lp.size());
  for (int64_t q = 0; q < b.pairs; ++q) {
    out[static_cast<size_t>(q)] = lp[static_cast<size_t>(2 * q)];
    out[static_cast<size_t>(b.pairs + q)] = lp[static_cast<size_t>(2 * q + 1)];
  }
  return out;
}

RefLogps compute_ref_logps(GPT2& ref, const std::vector<PreferencePair>& data, int64_t batch_pairs,
                           const BatchShape& shape) {
  RefLogps out;
  out.chosen.resize(data.size());
  out.rejected.resize(data.size());
  const int64_t n = static_cast<int64_t>(data.size());
  for (int64_t start = 0; start < n; start += batch_pairs) {
    std::vector<int64_t> idx;
    for (int64_t i = start; i < std::min(n, start + batch_pairs); ++i) idx.push_back(i);
    Batch b = shape.make(data, idx, grad_dtype(ref.dtype()));
    const std::vector<double> lp = sequence_logps(ref, b);
    for (int64_t p = 0; p < b.pairs; ++p) {  // b.indices: the batch's pair order (packing may reorder)
      out.chosen[static_cast<size_t>(b.indices[static_cast<size_t>(p)])] = lp[static_cast<size_t>(p)];
      out.rejected[static_cast<size_t>(b.indices[static_cast<size_t>(p)])] = lp[static_cast<size_t>(b.pairs + p)];
    }
  }
  return out;
}

namespace {

// SHA-256 of the token ids the reference scores, pair by pair (lengths first, so the split is unambiguous).
std::string tokens_sha256(const std::vector<PreferencePair>& data) {
  Sha256 h;
  auto add = [&](const std::vector<int32_t>& v) {
    const int64_t n = static_cast<int64_t>(v.size());
    h.update(&n, sizeof n);
    if (n > 0) h.update(v.data(), v.size() * sizeof(int32_t));
  };
  for (const auto& p : data) {
    add(p.prompt);
    add(p.chosen);
    add(p.rejected);
  }
  return h.hex();
}

// SHA-256 of the cached values as stored (F64 bytes of chosen, then rejected).
std::string values_sha256(const double* chosen, const double* rejected, int64_t n) {
  Sha256 h;
  h.update(chosen, static_cast<size_t>(n) * sizeof(double));
  h.update(rejected, static_cast<size_t>(n) * sizeof(double));
  return h.hex();
}

}  // namespace

void mix_weights_host(const Tensor& ref_host, const Tensor& policy_host, double alpha) {
  DPO_ASSERT(ref_host.device().kind == DeviceKind::CPU && policy_host.device().kind == DeviceKind::CPU,
             "mix_weights_host: host tensors only");
  DPO_ASSERT(ref_host.numel() == policy_host.numel(), "mix_weights_host: the reference has " +
                                                          std::to_string(ref_host.numel()) + " parameters, the policy " +
                                                          std::to_string(policy_host.numel()));
  DPO_ASSERT(alpha >= 0 && alpha <= 1, "mix_weights_host: alpha must be in [0, 1]");
  const int64_t n = ref_host.numel();
  const Tensor r = ref_host.reshape({n}), p = policy_host.reshape({n});
  // In chunks, so that the double copies stay small whatever the model's size.
  constexpr int64_t kChunk = int64_t{1} << 20;
  for (int64_t o = 0; o < n; o += kChunk) {
    const int64_t k = std::min(kChunk, n - o);
    const Tensor rv = r.view(o, {k});
    Tensor mixed = convert_host(rv, DType::F64, "reference weights");
    const Tensor pd = convert_host(p.view(o, {k}), DType::F64, "policy weights");
    double* m = mixed.data<double>();
    const double* q = pd.data<double>();
    for (int64_t i = 0; i < k; ++i) m[i] = alpha * q[i] + (1.0 - alpha) * m[i];
    const Tensor out = convert_host(mixed, rv.dtype(), "reference weights");  // the one rounding
    std::memcpy(rv.raw(), out.raw(), static_cast<size_t>(out.nbytes()));
  }
}

void sync_reference(GPT2& ref, const Tensor& policy_host, double alpha) {
  Backend& be = ref.backend();
  const int64_t n = ref.params().numel();
  DPO_ASSERT(policy_host.numel() == n, "sync_reference: the policy and the reference differ in size");
  Tensor host = Tensor::host({n}, ref.dtype());  // the stored values, in their own dtype (no device conversion)
  be.copy_to_host(host, ref.params());
  mix_weights_host(host, policy_host, alpha);
  // Through assign_weights, which also writes a BF16 model's F32 master when it has one (a forward-only reference
  // has none). BF16 -> F32 is exact and assign_weights rounds F32 -> BF16, which gives those BF16 values back.
  ref.assign_weights(ref.dtype() == DType::BF16 ? convert_host(host, DType::F32, "reference weights") : host);
}

std::string default_ref_cache_dir() {
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/dpo/ref";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/dpo/ref";
  return ".dpo-cache/ref";
}

RefCacheResult cached_ref_logps(GPT2& ref, const std::vector<PreferencePair>& data, const std::string& data_path,
                                const std::string& settings_in, const std::string& cache_dir, int64_t batch_pairs,
                                const BatchShape& shape) {
  namespace fs = std::filesystem;
  // LD-DPO's weights change the reference's log-probs themselves: recorded here, whatever the caller's settings
  // say, so a cache made without them (or with another ld_alpha) is never reused. Without ld_alpha the key is
  // unchanged (earlier caches stay valid). %a: the exact double.
  std::string settings = settings_in;
  if (shape.ld_alpha != 1.0) {
    char buf[64];
    std::snprintf(buf, sizeof buf, ";ld_alpha=%a", shape.ld_alpha);
    settings += buf;
  }
  Tensor host = Tensor::host({ref.params().numel()}, DType::F32);
  ref.backend().copy_to_host(host, ref.master_params());
  Sha256 wh;
  wh.update(gpt2_config_json(ref.config()));
  wh.update(host.raw(), static_cast<size_t>(host.nbytes()));
  const std::string weights_sha = wh.hex();
  const std::string data_sha = sha256_file(data_path);
  const std::string tokens_sha = tokens_sha256(data);
  const std::string key = sha256_string(weights_sha + "\n" + data_sha + "\n" + tokens_sha + "\n" + settings);
  std::map<std::string, std::string> meta = {{"key", key},
                                             {"weights_sha256", weights_sha},
                                             {"data_sha256", data_sha},
                                             {"tokens_sha256", tokens_sha},
                                             {"settings", settings},
                                             {"pairs", std::to_string(data.size())}};
  RefCacheResult r;
  r.path = (fs::path(cache_dir) / ("ref-" + key.substr(0, 32) + ".safetensors")).string();
  if (fs::exists(r.path)) {
    try {
      SafetensorsFile f(r.path);
      std::string why;
      for (const auto& [k, v] : meta) {
        auto it = f.metadata().find(k);
        if (it == f.metadata().end() || it->second != v) {
          why = "metadata '" + k + "' differs";
          break;
        }
      }
      if (why.empty()) {
        Tensor c = f.read_as("chosen", DType::F64), rj = f.read_as("rejected", DType::F64);
        const int64_t n = static_cast<int64_t>(data.size());
        auto vs = f.metadata().find("values_sha256");
        if (c.numel() != n || rj.numel() != n) {
          why = "holds " + std::to_string(c.numel()) + " pairs, data has " + std::to_string(n);
        } else if (vs == f.metadata().end()) {
          why = "no values_sha256 in its metadata";
        } else if (vs->second != values_sha256(c.data<double>(), rj.data<double>(), n)) {
          why = "its values do not match their SHA-256 (corrupted file)";
        } else {
          r.logps.chosen.assign(c.data<double>(), c.data<double>() + n);
          r.logps.rejected.assign(rj.data<double>(), rj.data<double>() + n);
          r.status = RefCacheResult::Status::Hit;
          return r;
        }
      }
      r.status = RefCacheResult::Status::Stale;
      r.reason = why;
    } catch (const Error& e) {
      r.status = RefCacheResult::Status::Stale;
      r.reason = e.what();
    }
  }
  // The folder first, so that a bad one stops the run before the reference pass, as an input error.
  std::error_code ec;
  fs::create_directories(cache_dir, ec);
  if (ec)
    throw InputError("key 'ref_cache_dir': cannot create the reference cache folder " + cache_dir + ": " +
                     ec.message() + " (ref_cache_dir unset: $XDG_CACHE_HOME/dpo/ref or ~/.cache/dpo/ref)");
  r.logps = compute_ref_logps(ref, data, batch_pairs, shape);
  const int64_t n = static_cast<int64_t>(data.size());
  Tensor c = Tensor::host({n}, DType::F64), rj = Tensor::host({n}, DType::F64);
  std::copy(r.logps.chosen.begin(), r.logps.chosen.end(), c.data<double>());
  std::copy(r.logps.rejected.begin(), r.logps.rejected.end(), rj.data<double>());
  meta["values_sha256"] = values_sha256(c.data<double>(), rj.data<double>(), n);
  save_safetensors(r.path, {{"chosen", c}, {"rejected", rj}}, meta);
  return r;
}

}  // namespace dpo
