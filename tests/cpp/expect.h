// The check macro of the host-only C++ tests in tests/cpp: EXPECT(cond, printf-format, args...) counts a
// failure in `failures` and prints the first 20 with where they happened.
#pragma once

#include <cstdio>

static int failures = 0;
#define EXPECT(cond, ...)                                            \
  do {                                                               \
    if (!(cond)) {                                                   \
      if (++failures <= 20) {                                        \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                                    \
        std::printf("\n");                                           \
      }                                                              \
    }                                                                \
  } while (0)
