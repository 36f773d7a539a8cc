#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "flashlm/gguf/reader.h"

namespace flashlm::gguf {

GGUFError::GGUFError(const std::string& what) : ValueError(what) {}
GGUFError::~GGUFError() = default;

std::shared_ptr<Mapping> Mapping::map_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw GGUFError("cannot open '" + path + "': " + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw GGUFError("'" + path + "' is not a regular file");
  }
  std::shared_ptr<Mapping> m(new Mapping());
  m->size_ = static_cast<uint64_t>(st.st_size);
  if (m->size_ > 0) {
    // MAP_PRIVATE + PROT_WRITE: tensors handed out as writable views (torch has no read-only tensors)
    // can be written without a crash, and the writes go to private copies of the pages, never the file.
    void* p = ::mmap(nullptr, m->size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      throw GGUFError("cannot map '" + path + "': " + std::strerror(err));
    }
    m->data_ = static_cast<uint8_t*>(p);
    m->mmapped_ = true;
  }
  ::close(fd);
  return m;
}

std::shared_ptr<Mapping> Mapping::copy_of(const void* data, size_t size) {
  std::shared_ptr<Mapping> m(new Mapping());
  m->size_ = size;
  if (size > 0) {
    m->data_ = static_cast<uint8_t*>(std::malloc(size));
    if (!m->data_) throw Error("out of memory copying a GGUF buffer");
    std::memcpy(m->data_, data, size);
  }
  return m;
}

Mapping::~Mapping() {
  if (!data_) return;
  if (mmapped_)
    ::munmap(data_, size_);
  else
    std::free(data_);
}

}  // namespace flashlm::gguf
