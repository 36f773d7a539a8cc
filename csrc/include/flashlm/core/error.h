// flashlm::Error and its kinds. The library throws, never prints-and-exits; the Python bindings map
// ValueError -> ValueError, NotImplementedError -> NotImplementedError, anything else -> RuntimeError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

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
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}
}  // namespace detail

}  // namespace flashlm

// FLASHLM_CHECK(cond, "q: expected 4 dims, got ", q.ndim) throws flashlm::ValueError with the message.
#define FLASHLM_CHECK(cond, ...)                                      \
  do {                                                                \
    if (!(cond)) throw ::flashlm::ValueError(::flashlm::detail::concat(__VA_ARGS__)); \
  } while (0)
