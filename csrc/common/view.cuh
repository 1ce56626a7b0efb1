// The tensor view every csrc/ host API takes: a (B, H, N, D) tensor as its data pointer plus the
// element strides of B, H and N; the D stride is 1. Plain C++ (no CUDA or torch headers).
#pragma once

#include <cstdint>

namespace fastdit {

struct View {
  void* data;
  int64_t sb;
  int64_t sh;
  int64_t sn;
};

}  // namespace fastdit
