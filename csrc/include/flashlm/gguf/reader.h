// GGUF reader (versions 2 and 3, little-endian). The file is memory-mapped and treated as untrusted:
// every count, length, offset and size is checked against the file before it is used, and any violation
// throws GGUFError naming what is wrong and at which byte offset. Tensor data is never copied: a tensor's
// bytes are a view into the mapping, which stays alive as long as any File or Mapping refers to it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "flashlm/core/dtype.h"
#include "flashlm/core/error.h"
#include "flashlm/core/export.h"
#include "flashlm/core/tensor.h"

namespace flashlm::gguf {

class FLASHLM_API GGUFError : public ValueError {
 public:
  explicit GGUFError(const std::string& what);
  ~GGUFError() override;
};

// Read-only bytes of a GGUF file: a private (copy-on-write) memory mapping, or a copy of a buffer.
class FLASHLM_API Mapping {
 public:
  static std::shared_ptr<Mapping> map_file(const std::string& path);
  static std::shared_ptr<Mapping> copy_of(const void* data, size_t size);
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  const uint8_t* data() const { return data_; }
  // Writable pointer into the mapping: writes land in private pages and never reach the file.
  uint8_t* mutable_data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  Mapping() = default;
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  bool mmapped_ = false;
};

// The value types of GGUF metadata, numbered as in the file format.
enum class ValueType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
FLASHLM_API const char* value_type_name(ValueType type);

// One metadata value. Scalars are held decoded; strings and arrays of numbers point into the mapping.
struct FLASHLM_API Value {
  ValueType type = ValueType::UINT8;
  uint64_t u = 0;            // UINT*, BOOL
  int64_t i = 0;             // INT*
  double f = 0;              // FLOAT*
  std::string_view string;   // STRING
  // ARRAY: element type and count. Numbers stay packed little-endian at `array_data` (possibly
  // unaligned); strings are listed in `strings`, nested arrays in `arrays`.
  ValueType array_type = ValueType::UINT8;
  uint64_t array_size = 0;
  const uint8_t* array_data = nullptr;
  std::vector<std::string_view> strings;
  std::vector<Value> arrays;

  bool is_integer() const;
  int64_t as_int() const;                 // any integer or bool type; throws on overflow
  double as_float() const;                // any numeric type
  std::string_view as_string() const;     // STRING only
  Value array_item(uint64_t index) const; // the index-th element of an ARRAY, as a Value
};

struct FLASHLM_API TensorInfo {
  std::string name;
  DType type = DType::F32;    // the GGML type, as a flashlm dtype
  uint32_t ggml_type = 0;     // the raw ggml_type id from the file
  std::vector<int64_t> dims;  // GGUF order: dims[0] is the innermost (contiguous) dimension
  uint64_t offset = 0;        // absolute byte offset of the data in the file
  uint64_t nbytes = 0;
  int64_t numel() const;
  std::vector<int64_t> torch_shape() const;  // dims reversed: row-major, outermost first
};

class FLASHLM_API File {
 public:
  static File open(const std::string& path);
  static File parse(std::shared_ptr<Mapping> mapping);  // what open() calls; also for in-memory files

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // where the tensor data section starts
  uint64_t file_size() const { return mapping_->size(); }

  const std::vector<std::pair<std::string, Value>>& metadata() const { return metadata_; }
  const Value* find(std::string_view key) const;  // nullptr if absent
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(std::string_view name) const;  // nullptr if absent

  const uint8_t* tensor_data(const TensorInfo& t) const { return mapping_->data() + t.offset; }
  // A CPU view of the tensor's blocks (dtype = its GGML type, shape in torch order).
  TensorView view(const TensorInfo& t) const;
  const std::shared_ptr<Mapping>& mapping() const { return mapping_; }

 private:
  std::shared_ptr<Mapping> mapping_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, Value>> metadata_;
  std::vector<TensorInfo> tensors_;
  friend class Parser;
};

}  // namespace flashlm::gguf
