// The row sums every CPU norm kernel takes (RMSNorm's sum of squares, LayerNorm's mean, variance and gradient
// sums): element i of a row goes to f32 lane i % kSumLanes, and the lanes are added as the AVX2 kernels add
// their four 8-wide accumulators: pairwise ((0+1)+(2+3)), then the 8 lanes of the result as
// ((l0+l4)+(l2+l6))+((l1+l5)+(l3+l7)). So the scalar and AVX2 kernels agree bit for bit.
#pragma once

namespace flashlm::norm::detail {

constexpr int kSumLanes = 32;

inline float sum_lanes(const float* acc) {
  float s[8];
  for (int j = 0; j < 8; ++j) s[j] = (acc[j] + acc[8 + j]) + (acc[16 + j] + acc[24 + j]);
  return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

}  // namespace flashlm::norm::detail
