#include <cstring>
#include <limits>

#include "flashlm/gguf/reader.h"

namespace flashlm::gguf {

const char* value_type_name(ValueType type) {
  switch (type) {
    case ValueType::UINT8: return "UINT8";
    case ValueType::INT8: return "INT8";
    case ValueType::UINT16: return "UINT16";
    case ValueType::INT16: return "INT16";
    case ValueType::UINT32: return "UINT32";
    case ValueType::INT32: return "INT32";
    case ValueType::FLOAT32: return "FLOAT32";
    case ValueType::BOOL: return "BOOL";
    case ValueType::STRING: return "STRING";
    case ValueType::ARRAY: return "ARRAY";
    case ValueType::UINT64: return "UINT64";
    case ValueType::INT64: return "INT64";
    case ValueType::FLOAT64: return "FLOAT64";
  }
  return "UNKNOWN";
}

bool Value::is_integer() const {
  switch (type) {
    case ValueType::UINT8: case ValueType::INT8: case ValueType::UINT16: case ValueType::INT16:
    case ValueType::UINT32: case ValueType::INT32: case ValueType::UINT64: case ValueType::INT64:
    case ValueType::BOOL:
      return true;
    default:
      return false;
  }
}

int64_t Value::as_int() const {
  switch (type) {
    case ValueType::INT8: case ValueType::INT16: case ValueType::INT32: case ValueType::INT64:
      return i;
    case ValueType::UINT8: case ValueType::UINT16: case ValueType::UINT32: case ValueType::UINT64: case ValueType::BOOL:
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        throw GGUFError("metadata value " + std::to_string(u) + " does not fit in int64");
      return static_cast<int64_t>(u);
    default:
      throw GGUFError(std::string("metadata value of type ") + value_type_name(type) + " is not an integer");
  }
}

double Value::as_float() const {
  if (type == ValueType::FLOAT32 || type == ValueType::FLOAT64) return f;
  if (type == ValueType::UINT64 || type == ValueType::UINT8 || type == ValueType::UINT16 ||
      type == ValueType::UINT32 || type == ValueType::BOOL)
    return static_cast<double>(u);
  if (is_integer()) return static_cast<double>(i);
  throw GGUFError(std::string("metadata value of type ") + value_type_name(type) + " is not a number");
}

std::string_view Value::as_string() const {
  if (type != ValueType::STRING)
    throw GGUFError(std::string("metadata value of type ") + value_type_name(type) + " is not a string");
  return string;
}

namespace {
template <class T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
}  // namespace

Value Value::array_item(uint64_t index) const {
  if (type != ValueType::ARRAY) throw GGUFError(std::string("metadata value of type ") + value_type_name(type) + " is not an array");
  if (index >= array_size) throw GGUFError("array index " + std::to_string(index) + " out of range (size " + std::to_string(array_size) + ")");
  Value v;
  v.type = array_type;
  switch (array_type) {
    case ValueType::STRING: v.string = strings[index]; break;
    case ValueType::ARRAY: return arrays[index];
    case ValueType::UINT8: v.u = load<uint8_t>(array_data + index); break;
    case ValueType::BOOL: v.u = load<uint8_t>(array_data + index); break;
    case ValueType::INT8: v.i = load<int8_t>(array_data + index); break;
    case ValueType::UINT16: v.u = load<uint16_t>(array_data + 2 * index); break;
    case ValueType::INT16: v.i = load<int16_t>(array_data + 2 * index); break;
    case ValueType::UINT32: v.u = load<uint32_t>(array_data + 4 * index); break;
    case ValueType::INT32: v.i = load<int32_t>(array_data + 4 * index); break;
    case ValueType::FLOAT32: v.f = load<float>(array_data + 4 * index); break;
    case ValueType::UINT64: v.u = load<uint64_t>(array_data + 8 * index); break;
    case ValueType::INT64: v.i = load<int64_t>(array_data + 8 * index); break;
    case ValueType::FLOAT64: v.f = load<double>(array_data + 8 * index); break;
  }
  return v;
}

}  // namespace flashlm::gguf
