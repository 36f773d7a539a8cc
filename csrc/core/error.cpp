#include "flashlm/core/error.h"

namespace flashlm {

// Out-of-line destructors anchor each class's type info in libflashlm, so a catch in another module
// (the Python bindings, a C++ program) matches what the library throws.
Error::Error(const std::string& what) : std::runtime_error(what) {}
Error::~Error() = default;
ValueError::ValueError(const std::string& what) : Error(what) {}
ValueError::~ValueError() = default;
NotImplementedError::NotImplementedError(const std::string& what) : Error(what) {}
NotImplementedError::~NotImplementedError() = default;

}  // namespace flashlm
