// Float32 row loops of a softmax, shared by the kernels that make one (attention's score
// tiles, the cross-entropy's logits): vectorized for the CPU they run on (vectorize.h).
#pragma once

#include <cstdint>

namespace fuseformer::cpu {

// max_j s[j] (-inf for n = 0).
float row_max(const float* s, int64_t n);

// s <- exp(scale * s - shift), returns the sum (scale 1: the scores are final already).
float exp_shifted_sum(float* s, int64_t n, float scale, float shift);

// x <- x * factor.
void scale_row(float* x, int64_t n, float factor);

// x <- x * factor + offset.
void affine_row(float* x, int64_t n, float factor, float offset);

// sum_j x[j], in vector lanes of float added in double (a row of 50k logits keeps the
// accuracy of PyTorch's pairwise sum).
float row_sum(const float* x, int64_t n);

}  // namespace fuseformer::cpu
