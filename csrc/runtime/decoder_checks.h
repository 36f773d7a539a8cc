// The decoder stack's argument checks (decoder_checks.cpp): the layers and ends when a Decoder is built, each
// step's views when it runs. Every failed check is a ValueError naming the layer and tensor, or the argument.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "flashlm/runtime/decoder.h"

namespace flashlm::runtime::detail {

inline bool present(const QuantLinear& l) { return l.weight.data != nullptr; }
// An optional view was given: it has data or a shape (an empty one is then refused by its check).
inline bool given(const TensorView& t) { return t.data != nullptr || t.ndim != 0; }

void check_layers(const DecoderConfig& c, const std::vector<DecoderLayer>& layers);
void check_ends(const DecoderConfig& c, const DecoderEnds& e);
// The step's views against the config and the layers (their count, and whether some rotate by local tables).
void check_step(const DecoderConfig& c, const std::vector<DecoderLayer>& layers, const DecoderStep& s);

}  // namespace flashlm::runtime::detail
