// Symbol visibility: libflashlm is built with hidden visibility; what carries FLASHLM_API is its public ABI.
#pragma once

#if defined(_WIN32)
#  if defined(FLASHLM_BUILDING_LIBRARY)
#    define FLASHLM_API __declspec(dllexport)
#  else
#    define FLASHLM_API __declspec(dllimport)
#  endif
#else
#  define FLASHLM_API __attribute__((visibility("default")))
#endif
