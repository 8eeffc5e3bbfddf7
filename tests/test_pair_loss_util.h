// Test helper shared by the CPU and CUDA preference-loss tests: PairLossParams (kernels/pair_loss.h) from a list of
// (loss type, weight) terms and the scalar settings.
#pragma once

#include <initializer_list>
#include <utility>

#include "kernels/pair_loss.h"

namespace dpo::test {

inline PairLossParams params_for(std::initializer_list<std::pair<LossType, double>> terms, double beta,
                                 double ls = 0.0, IpoNorm norm = IpoNorm::PerToken,
                                 RefMode ref = RefMode::WithReference) {
  PairLossParams p;
  for (const auto& [t, w] : terms) {
    p.type[p.n_terms] = t;
    p.weight[p.n_terms] = w;
    ++p.n_terms;
  }
  p.beta = beta;
  p.label_smoothing = ls;
  p.ipo_norm = norm;
  p.ref = ref;
  return p;
}

}  // namespace dpo::test
