// The public C++ API of libflashlm: include this and link flashlm::flashlm.
#pragma once

#include "flashlm/attention/flash_attention.h"
#include "flashlm/comm/ring.h"
#include "flashlm/core/build_info.h"
#include "flashlm/core/cpu_features.h"
#include "flashlm/core/cuda.h"
#include "flashlm/core/dtype.h"
#include "flashlm/core/error.h"
#include "flashlm/core/tensor.h"
#include "flashlm/core/thread_pool.h"
#include "flashlm/gemm/gguf_matmul.h"
#include "flashlm/gemm/int_gemm.h"
#include "flashlm/gguf/blocks.h"
#include "flashlm/gguf/dequantize.h"
#include "flashlm/gguf/reader.h"
#include "flashlm/kvcache/paged_attention.h"
#include "flashlm/optim/adamw.h"
