// flashlm::Error and its kinds. The library throws, never prints-and-exits; the Python bindings map
// ValueError -> ValueError, NotImplementedError -> NotImplementedError, anything else -> RuntimeError.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#include "flashlm/core/export.h"

namespace flashlm {

class FLASHLM_API Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what);
  ~Error() override;
};

// A bad argument: wrong shape, dtype, device, size or value. The message names the argument.
class FLASHLM_API ValueError : public Error {
 public:
  explicit ValueError(const std::string& what);
  ~ValueError() override;
};

// A valid request this build or device cannot serve (e.g. a CUDA tensor in a build without CUDA).
class FLASHLM_API NotImplementedError : public Error {
 public:
  explicit NotImplementedError(const std::string& what);
  ~NotImplementedError() override;
};

namespace detail {
// Error messages are built by appending strings, never with iostreams: a process may hold two copies of
// libstdc++ (one linked statically into a library), and iostreams' shared locale state breaks across them.
inline void append(std::string& out, std::string_view s) { out.append(s.data(), s.size()); }
inline void append(std::string& out, char c) { out.push_back(c); }
template <class T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& out, T v) {
  out += std::to_string(v);
}

template <class... Args>
std::string concat(const Args&... args) {
  std::string out;
  (append(out, args), ...);
  return out;
}
}  // namespace detail

}  // namespace flashlm

// FLASHLM_CHECK(cond, "q: expected 4 dims, got ", q.ndim) throws flashlm::ValueError with the message.
#define FLASHLM_CHECK(cond, ...)                                      \
  do {                                                                \
    if (!(cond)) throw ::flashlm::ValueError(::flashlm::detail::concat(__VA_ARGS__)); \
  } while (0)
