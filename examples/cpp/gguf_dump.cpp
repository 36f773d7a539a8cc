// gguf_dump: open a GGUF file with libflashlm, print its metadata and tensor table, and dequantize one
// tensor (the one named on the command line, else the first) to float32, printing its first values.
//
//   gguf_dump FILE [TENSOR]
#include <cstdio>
#include <string>
#include <vector>

#include "flashlm/flashlm.h"

namespace {

std::string show(const flashlm::gguf::Value& v) {
  using flashlm::gguf::ValueType;
  switch (v.type) {
    case ValueType::STRING: {
      std::string s(v.as_string().substr(0, 60));
      return "\"" + s + (v.as_string().size() > 60 ? "...\"" : "\"");
    }
    case ValueType::FLOAT32:
    case ValueType::FLOAT64: return std::to_string(v.as_float());
    case ValueType::BOOL: return v.u ? "true" : "false";
    case ValueType::ARRAY: {
      std::string out = "[";
      for (uint64_t i = 0; i < v.array_size && i < 4; ++i) out += (i ? ", " : "") + show(v.array_item(i));
      if (v.array_size > 4) out += ", ... (" + std::to_string(v.array_size) + " items)";
      return out + "]";
    }
    default: return std::to_string(v.as_int());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s FILE [TENSOR]\n", argv[0]);
    return 2;
  }
  try {
    const flashlm::gguf::File file = flashlm::gguf::File::open(argv[1]);
    std::printf("GGUF v%u, alignment %llu, %zu metadata keys, %zu tensors (libflashlm %s)\n", file.version(),
                static_cast<unsigned long long>(file.alignment()), file.metadata().size(), file.tensors().size(),
                flashlm::build_info().version.c_str());
    for (const auto& [key, value] : file.metadata())
      std::printf("  %-40s %s\n", key.c_str(), show(value).c_str());
    for (const auto& t : file.tensors()) {
      std::string shape;
      for (int64_t d : t.torch_shape()) shape += (shape.empty() ? "" : " x ") + std::to_string(d);
      std::printf("  %-32s %-6s [%s] at %llu, %llu bytes\n", t.name.c_str(), flashlm::dtype_name(t.type), shape.c_str(),
                  static_cast<unsigned long long>(t.offset), static_cast<unsigned long long>(t.nbytes));
    }
    if (file.tensors().empty()) return 0;

    const flashlm::gguf::TensorInfo* t = argc > 2 ? file.find_tensor(argv[2]) : &file.tensors()[0];
    if (!t) {
      std::fprintf(stderr, "no tensor named '%s'\n", argv[2]);
      return 1;
    }
    flashlm::TensorView src = file.view(*t);
    std::vector<float> out(static_cast<size_t>(t->numel()));
    flashlm::TensorView dst = flashlm::TensorView::contiguous(out.data(), flashlm::DType::F32, src.ndim, src.shape);
    flashlm::dequantize(src, dst);  // CPU: runs on the library's thread pool
    std::printf("%s as f32:", t->name.c_str());
    for (size_t i = 0; i < out.size() && i < 8; ++i) std::printf(" %.9g", out[i]);  // 9 digits: round-trips a float
    std::printf("\n");
  } catch (const flashlm::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
