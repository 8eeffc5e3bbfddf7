// Seeded, portable random numbers: xoshiro256** seeded through splitmix64, Box-Muller normals.
// Unlike std::normal_distribution the sequence is defined here, so it is identical across compilers and
// standard libraries, which a bit-identical resume needs. The state is four words that can be saved and restored.
#pragma once

#include <array>
#include <cstdint>

namespace dpo {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0) { reseed(seed); }
  void reseed(uint64_t seed);

  uint64_t next_u64();
  // Uniform in [0, 1) with 53 random bits.
  double uniform();
  // Uniform integer in [0, n); n > 0. Rejection sampling, so unbiased.
  uint64_t below(uint64_t n);
  // Standard normal (Box-Muller; no cached second value, so the state is just s_).
  double normal();

  std::array<uint64_t, 4> state() const { return s_; }
  void set_state(const std::array<uint64_t, 4>& s) { s_ = s; }

 private:
  std::array<uint64_t, 4> s_{};
};

}  // namespace dpo
