// GGUF parser. Layout (little-endian): "GGUF", u32 version, u64 tensor_count, u64 kv_count, the key-value
// pairs, the tensor infos, padding to `general.alignment`, then the tensor data. Every read goes through
// Parser::need, which checks the bytes are there; every count is checked against the bytes left before
// anything is reserved, so memory use is bounded by the file's size, not by what a count claims.
#include <algorithm>
#include <cstring>
#include <limits>
#include <unordered_set>

#include "flashlm/gguf/reader.h"

namespace flashlm::gguf {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr int kMaxArrayDepth = 8;
constexpr uint64_t kMaxNestedArrays = 1u << 20;
constexpr uint32_t kMaxDimsGGUF = 4;  // GGML_MAX_DIMS

uint64_t scalar_size(ValueType t) {
  switch (t) {
    case ValueType::UINT8: case ValueType::INT8: case ValueType::BOOL: return 1;
    case ValueType::UINT16: case ValueType::INT16: return 2;
    case ValueType::UINT32: case ValueType::INT32: case ValueType::FLOAT32: return 4;
    case ValueType::UINT64: case ValueType::INT64: case ValueType::FLOAT64: return 8;
    default: return 0;
  }
}

// Strict UTF-8 (no overlong forms, surrogates or code points above U+10FFFF), as the GGUF spec requires.
bool valid_utf8(const uint8_t* s, uint64_t n) {
  uint64_t i = 0;
  while (i < n) {
    uint8_t c = s[i];
    if (c < 0x80) { ++i; continue; }
    int len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else return false;
    if (n - i < static_cast<uint64_t>(len)) return false;
    for (int k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

// A key or tensor name for an error message, in quotes: control characters (C0, DEL, C1) escaped so that a
// hostile name can neither break the one-line message nor drive a terminal, and cut after about 80 bytes.
// Names reach here validated as UTF-8, so cutting before a non-continuation byte keeps whole characters.
std::string quoted(std::string_view name) {
  constexpr size_t kMaxQuoted = 80;
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "'";
  for (size_t i = 0; i < name.size(); ++i) {
    auto c = static_cast<uint8_t>(name[i]);
    if (i >= kMaxQuoted && (c & 0xC0) != 0x80) return out + "'...";
    // C1 controls (U+0080..U+009F) are 0xC2 0x80..0x9F in UTF-8.
    bool c1 = c == 0xC2 && i + 1 < name.size() && (static_cast<uint8_t>(name[i + 1]) & 0xE0) == 0x80;
    if (c1) c = static_cast<uint8_t>(name[++i]);
    if (c < 0x20 || c == 0x7F || c1 || c == '\\' || c == '\'') {
      out += c1 ? "\\u00" : "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "'";
}

}  // namespace

class Parser {
 public:
  explicit Parser(File& file) : f_(file), base_(file.mapping_->data()), size_(file.mapping_->size()) {}

  void parse() {
    parse_header();
    parse_metadata();
    parse_tensor_infos();
    place_tensor_data();
  }

 private:
  [[noreturn]] void fail(const std::string& what, uint64_t at) const {
    throw GGUFError(what + " (at byte " + std::to_string(at) + " of " + std::to_string(size_) + ")");
  }

  uint64_t left() const { return size_ - pos_; }

  void need(uint64_t n, const char* what) const {
    if (n > left())
      fail(std::string("file truncated: ") + what + " needs " + std::to_string(n) + " bytes, " +
               std::to_string(left()) + " left", pos_);
  }

  template <class T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string_view read_string(const char* what) {
    uint64_t start = pos_;
    uint64_t len = read<uint64_t>(what);
    if (len > left())
      fail(std::string(what) + " claims " + std::to_string(len) + " bytes but only " + std::to_string(left()) +
               " are left", start);
    const uint8_t* p = base_ + pos_;
    if (!valid_utf8(p, len)) fail(std::string(what) + " is not valid UTF-8", start);
    pos_ += len;
    return std::string_view(reinterpret_cast<const char*>(p), len);
  }

  // A count of items, each taking at least `min_item_bytes` in the file, must fit in the bytes left.
  void check_count(uint64_t count, uint64_t min_item_bytes, const std::string& what, uint64_t at) const {
    if (count > left() / min_item_bytes)
      fail(what + " count " + std::to_string(count) + " cannot fit in the " + std::to_string(left()) +
               " bytes left", at);
  }

  ValueType read_value_type(const char* what) {
    uint64_t at = pos_;
    uint32_t t = read<uint32_t>(what);
    if (t > static_cast<uint32_t>(ValueType::FLOAT64)) fail(std::string("unknown ") + what + " " + std::to_string(t), at);
    return static_cast<ValueType>(t);
  }

  void parse_header() {
    if (size_ < 4) fail("file too small for the GGUF magic", 0);
    uint32_t magic = read<uint32_t>("magic");
    if (magic != kMagic) {
      char m[5] = {};
      std::memcpy(m, base_, 4);
      for (char& c : m)
        if (c && (c < 32 || c > 126)) c = '?';
      fail(std::string("not a GGUF file: magic is '") + m + "', expected 'GGUF'", 0);
    }
    uint64_t at = pos_;
    uint32_t version = read<uint32_t>("version");
    if (version == 0x02000000u || version == 0x03000000u) fail("big-endian GGUF files are not supported", at);
    if (version == 1) fail("GGUF version 1 is not supported (only 2 and 3)", at);
    if (version != 2 && version != 3) fail("unsupported GGUF version " + std::to_string(version) + " (only 2 and 3)", at);
    f_.version_ = version;
    at = pos_;
    n_tensors_ = read<uint64_t>("tensor count");
    n_tensors_at_ = at;
    at = pos_;
    n_kv_ = read<uint64_t>("metadata count");
    // A key-value pair takes at least 13 bytes (key length, type, a 1-byte value); a tensor info 24.
    check_count(n_kv_, 13, "metadata", at);
    check_count(n_tensors_, 24, "tensor", n_tensors_at_);
  }

  void parse_value(Value& v, ValueType type, int depth) {
    v.type = type;
    switch (type) {
      case ValueType::UINT8: v.u = read<uint8_t>("UINT8 value"); break;
      case ValueType::INT8: v.i = read<int8_t>("INT8 value"); break;
      case ValueType::UINT16: v.u = read<uint16_t>("UINT16 value"); break;
      case ValueType::INT16: v.i = read<int16_t>("INT16 value"); break;
      case ValueType::UINT32: v.u = read<uint32_t>("UINT32 value"); break;
      case ValueType::INT32: v.i = read<int32_t>("INT32 value"); break;
      case ValueType::UINT64: v.u = read<uint64_t>("UINT64 value"); break;
      case ValueType::INT64: v.i = read<int64_t>("INT64 value"); break;
      case ValueType::FLOAT32: v.f = read<float>("FLOAT32 value"); break;
      case ValueType::FLOAT64: v.f = read<double>("FLOAT64 value"); break;
      case ValueType::BOOL: {
        uint64_t at = pos_;
        v.u = read<uint8_t>("BOOL value");
        if (v.u > 1) fail("BOOL value " + std::to_string(v.u) + " is neither 0 nor 1", at);
        break;
      }
      case ValueType::STRING: v.string = read_string("string value"); break;
      case ValueType::ARRAY: parse_array(v, depth); break;
    }
  }

  void parse_array(Value& v, int depth) {
    uint64_t at = pos_;
    if (depth >= kMaxArrayDepth) fail("arrays nested deeper than " + std::to_string(kMaxArrayDepth), at);
    v.array_type = read_value_type("array element type");
    uint64_t count_at = pos_;
    v.array_size = read<uint64_t>("array length");
    if (uint64_t size = scalar_size(v.array_type)) {
      check_count(v.array_size, size, std::string("array of ") + value_type_name(v.array_type), count_at);
      v.array_data = base_ + pos_;
      if (v.array_type == ValueType::BOOL)
        for (uint64_t k = 0; k < v.array_size; ++k)
          if (v.array_data[k] > 1) fail("BOOL array element is neither 0 nor 1", pos_ + k);
      pos_ += v.array_size * size;
    } else if (v.array_type == ValueType::STRING) {
      check_count(v.array_size, 8, "array of STRING", count_at);
      v.strings.reserve(v.array_size);
      for (uint64_t k = 0; k < v.array_size; ++k) v.strings.push_back(read_string("string in array"));
    } else {
      check_count(v.array_size, 12, "array of ARRAY", count_at);
      if ((nested_arrays_ += v.array_size) > kMaxNestedArrays)
        fail("more than " + std::to_string(kMaxNestedArrays) + " nested arrays", count_at);
      v.arrays.resize(v.array_size);
      for (Value& item : v.arrays) parse_value(item, ValueType::ARRAY, depth + 1);
    }
  }

  void parse_metadata() {
    std::unordered_set<std::string_view> keys;
    f_.metadata_.reserve(n_kv_);
    for (uint64_t k = 0; k < n_kv_; ++k) {
      uint64_t at = pos_;
      std::string_view key = read_string("metadata key");
      if (!keys.insert(key).second) fail("duplicate metadata key " + quoted(key), at);
      f_.metadata_.emplace_back(std::string(key), Value{});
      Value& v = f_.metadata_.back().second;
      parse_value(v, read_value_type("metadata value type"), 0);
      if (key == "general.alignment") {
        if (v.type != ValueType::UINT32) fail("general.alignment must be UINT32, got " + std::string(value_type_name(v.type)), at);
        if (v.u == 0 || (v.u & (v.u - 1)) != 0) fail("general.alignment " + std::to_string(v.u) + " is not a power of two", at);
        f_.alignment_ = v.u;
      }
    }
  }

  void parse_tensor_infos() {
    std::unordered_set<std::string_view> names;
    f_.tensors_.reserve(n_tensors_);
    for (uint64_t k = 0; k < n_tensors_; ++k) {
      uint64_t at = pos_;
      std::string_view name = read_string("tensor name");
      if (!names.insert(name).second) fail("duplicate tensor name " + quoted(name), at);
      TensorInfo t;
      t.name = std::string(name);
      const std::string label = "tensor " + quoted(t.name);
      uint64_t dims_at = pos_;
      uint32_t n_dims = read<uint32_t>("tensor dimension count");
      if (n_dims > kMaxDimsGGUF)
        fail(label + " has " + std::to_string(n_dims) + " dimensions; GGUF allows at most " + std::to_string(kMaxDimsGGUF), dims_at);
      // The product counts a zero dimension as 1: strides are computed that way (by torch and TensorView),
      // so [2^62, 0, 4] has no elements but cannot be viewed either.
      int64_t strided = 1;
      for (uint32_t d = 0; d < n_dims; ++d) {
        uint64_t dim_at = pos_;
        uint64_t dim = read<uint64_t>("tensor dimension");
        if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
          fail(label + " dimension " + std::to_string(d) + " is " + std::to_string(dim) + ", beyond int64", dim_at);
        t.dims.push_back(static_cast<int64_t>(dim));
        if (__builtin_mul_overflow(strided, std::max<int64_t>(static_cast<int64_t>(dim), 1), &strided))
          fail(label + " has more elements than int64 can count", dim_at);
      }
      const int64_t numel = t.numel();  // <= strided: cannot overflow
      uint64_t type_at = pos_;
      t.ggml_type = read<uint32_t>("tensor type");
      auto dtype = dtype_from_ggml(t.ggml_type);
      if (!dtype) fail(label + " has unknown ggml type " + std::to_string(t.ggml_type), type_at);
      t.type = *dtype;
      const DTypeInfo& info = dtype_info(t.type);
      int64_t inner = n_dims ? t.dims[0] : 1;
      if (inner % info.block_size != 0)
        fail(label + " of type " + info.name + " has innermost dimension " + std::to_string(inner) +
                 ", not a multiple of its block size " + std::to_string(info.block_size), dims_at);
      int64_t nbytes;
      if (__builtin_mul_overflow(numel / info.block_size, info.block_bytes, &nbytes))
        fail(label + " byte size overflows int64", dims_at);
      t.nbytes = static_cast<uint64_t>(nbytes);
      uint64_t offset_at = pos_;
      t.offset = read<uint64_t>("tensor data offset");
      if (t.offset % f_.alignment_ != 0)
        fail(label + " data offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
                 std::to_string(f_.alignment_), offset_at);
      offset_positions_.push_back(offset_at);
      f_.tensors_.push_back(std::move(t));
    }
  }

  // Tensor data in file order: each tensor starts at or after the end of the one before (ggml lays them
  // out so, and reads a file with overlapping or out-of-order offsets as an error). Offsets are relative to
  // the data section until here, absolute after.
  void place_tensor_data() {
    uint64_t a = f_.alignment_;
    uint64_t data = pos_ % a ? pos_ + (a - pos_ % a) : pos_;  // pos_ <= size_, so this cannot overflow
    f_.data_offset_ = data;
    uint64_t previous_end = 0;  // relative, of tensor k - 1
    for (size_t k = 0; k < f_.tensors_.size(); ++k) {
      TensorInfo& t = f_.tensors_[k];
      const std::string range = "data [" + std::to_string(t.offset) + ", +" + std::to_string(t.nbytes) + ")";
      // Empty tensors too: their offset is reported, and a view of zero bytes must still point into the file.
      uint64_t begin, end;
      if (__builtin_add_overflow(data, t.offset, &begin) || __builtin_add_overflow(begin, t.nbytes, &end) || end > size_)
        fail("tensor " + quoted(t.name) + " " + range + " relative to the data section at " + std::to_string(data) +
                 " lies outside the file",
             offset_positions_[k]);
      if (k > 0 && t.offset < previous_end) {
        const TensorInfo& p = f_.tensors_[k - 1];
        fail("tensor " + quoted(t.name) + " " + range + " starts before the end of tensor " + quoted(p.name) +
                 " data [" + std::to_string(p.offset - data) + ", +" + std::to_string(p.nbytes) +
                 ") (offsets relative to the data section; tensor data must not overlap and must follow the tensor "
                 "order)",
             offset_positions_[k]);
      }
      previous_end = t.offset + t.nbytes;  // end <= size_: cannot overflow
      t.offset = begin;
    }
  }

  File& f_;
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
  uint64_t n_tensors_ = 0, n_tensors_at_ = 0, n_kv_ = 0;
  uint64_t nested_arrays_ = 0;
  std::vector<uint64_t> offset_positions_;
};

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

std::vector<int64_t> TensorInfo::torch_shape() const { return std::vector<int64_t>(dims.rbegin(), dims.rend()); }

File File::parse(std::shared_ptr<Mapping> mapping) {
  if (!mapping) throw GGUFError("no data to parse");
  File f;
  f.mapping_ = std::move(mapping);
  Parser(f).parse();
  return f;
}

File File::open(const std::string& path) {
  auto mapping = Mapping::map_file(path);
  try {
    return parse(std::move(mapping));
  } catch (const GGUFError& e) {
    throw GGUFError(path + ": " + e.what());
  }
}

const Value* File::find(std::string_view key) const {
  for (const auto& kv : metadata_)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

const TensorInfo* File::find_tensor(std::string_view name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

TensorView File::view(const TensorInfo& t) const {
  std::vector<int64_t> shape = t.torch_shape();
  return TensorView::contiguous(mapping_->mutable_data() + t.offset, t.type, static_cast<int>(shape.size()), shape.data());
}

}  // namespace flashlm::gguf
