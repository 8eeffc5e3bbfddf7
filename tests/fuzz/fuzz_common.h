// Shared by the libFuzzer targets (tests/fuzz/README.md): the readers under test take a path, so each input is
// written to one scratch file per process first. A reader may refuse an input only with dpo::Error (the project's
// error path: InputError -> exit 2); any other exception escapes LLVMFuzzerTestOneInput, terminates the process and
// is reported by libFuzzer as a crash, like a sanitizer report.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>

namespace dpo::fuzz {

// A scratch file of this process under TMPDIR (or /tmp) with `data` as its whole content; returns its path.
inline const std::string& write_input(const char* tag, const uint8_t* data, size_t size) {
  static const std::string path = [&] {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir && *dir ? dir : "/tmp") + "/dpo_fuzz_" + tag + "_" + std::to_string(::getpid());
  }();
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  f.close();
  return path;
}

}  // namespace dpo::fuzz
