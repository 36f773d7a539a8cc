// Fuzz target for the GGUF parser: any input must either parse, after which every value, tensor byte and
// (for small tensors) dequantized element can be read in bounds, or throw GGUFError. Any other exception,
// a crash, an out-of-bounds access or undefined behaviour is a bug. Not part of CI.
//
// libFuzzer (from the repository root; `apt-get install clang libclang-rt-14-dev`):
//   clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
//     -mavx2 -mfma -mf16c -DFLASHLM_HAVE_AVX2_KERNELS -DFLASHLM_VERSION='"fuzz"' -Icsrc/include \
//     tests/fuzz/gguf_fuzz.cpp csrc/core/*.cpp csrc/gguf/*.cpp -lpthread -o /tmp/gguf_fuzz
//   FLASHLM_GGUF_CORPUS=/tmp/gguf_seeds python -m pytest -q tests/test_gguf_malformed.py  # seed inputs
//   /tmp/gguf_fuzz -max_total_time=300 -max_len=4096 -rss_limit_mb=1024 /tmp/gguf_corpus /tmp/gguf_seeds
//
// Without libFuzzer (replays the files named on the command line), e.g. with g++:
//   g++ -std=c++17 -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all -DGGUF_FUZZ_STANDALONE \
//     -mavx2 -mfma -mf16c -DFLASHLM_HAVE_AVX2_KERNELS -DFLASHLM_VERSION='"fuzz"' -Icsrc/include \
//     tests/fuzz/gguf_fuzz.cpp csrc/core/*.cpp csrc/gguf/*.cpp -lpthread -o /tmp/gguf_replay
//   /tmp/gguf_replay /tmp/gguf_seeds/*
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <vector>

#include "flashlm/gguf/dequantize.h"
#include "flashlm/gguf/reader.h"

using namespace flashlm;
using namespace flashlm::gguf;

namespace {

volatile uint64_t g_sink;  // keeps the reads below from being optimized away

void touch(const Value& v) {
  if (v.type == ValueType::STRING)
    for (char c : v.string) g_sink += static_cast<uint8_t>(c);
  if (v.type != ValueType::ARRAY) return;
  for (uint64_t k = 0; k < v.array_size; ++k) {
    Value item = v.array_item(k);
    touch(item);
    if (item.is_integer()) g_sink += item.u + static_cast<uint64_t>(item.i);
  }
}

void touch(const File& f) {
  for (const auto& [key, value] : f.metadata()) {
    g_sink += key.size();
    touch(value);
    if (f.find(key) == nullptr) __builtin_trap();
  }
  for (const TensorInfo& t : f.tensors()) {
    if (t.offset > f.file_size() || t.nbytes > f.file_size() - t.offset) __builtin_trap();
    const uint8_t* p = f.tensor_data(t);
    for (uint64_t k = 0; k < t.nbytes; ++k) g_sink += p[k];
    TensorView src = f.view(t);
    // Dequantizing reads exactly the tensor's bytes; bounded so that a big tensor does not stall the fuzzer.
    if (dequantize_supported(t.type) && t.numel() <= (1 << 16)) {
      std::vector<float> out(static_cast<size_t>(t.numel()));
      TensorView dst = TensorView::contiguous(out.data(), DType::F32, src.ndim, src.shape);
      dequantize(src, dst);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    File f = File::parse(Mapping::copy_of(data, size));
    touch(f);
  } catch (const GGUFError&) {
  }
  return 0;
}

#ifdef GGUF_FUZZ_STANDALONE
int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::ifstream in(argv[i], std::ios::binary);
    std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
  }
  std::printf("replayed %d inputs\n", argc - 1);
  return 0;
}
#endif
