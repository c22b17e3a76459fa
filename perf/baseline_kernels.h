// Permutation kernels of the NCCL all-to-all baseline (baseline_kernels.cu). Plain CUDA, stream-ordered.
//
//   copyRows:   dst row (dst_rows ? dst_rows[i] : i) = src row (src_rows ? src_rows[i] : i), i < num_rows, rows of
//               row_bytes bytes (16-byte vectors when row_bytes and both bases allow it, else 4-byte, else bytes).
//   reduceRows: out[t, c] = bf16(sum over m < fan_in ascending with rows[t * fan_in + m] >= 0 of
//               (weights ? weights[t * fan_in + m] * v : v)), v = float(in[rows[t * fan_in + m], c]), FP32 with
//               separate multiply and add (the CPU reference's order and rounding; no fused multiply-add).
//               With groups (LL combine, ref::ll_combine's two levels): per group g < num_groups ascending,
//               part = fmaf chain over the slots m with groups[t * fan_in + m] == g (m ascending) rounded to bf16,
//               out = bf16(FP32 sum of those parts, g ascending; groups with no slot skipped).
//   holdStream: one thread spins for `microseconds` on the GPU's global timer. Enqueued between the barrier and the
//               first timing event so the host has enqueued the timed call before the GPU reaches the event: the
//               events then measure GPU execution, not the host's launch latency.
//   holdAndMeet: the hold, then a meeting of all ranks on the device: this rank stores `epoch` (system-scope
//               release) into word `me` of every rank's flags (`peers[r]`, a device array of R pointers, itself
//               included) and waits until every word r < R of its own `flags` is >= epoch (acquire). The ranks
//               leave within about one NVLink flag trip of each other, whatever the skew of the NCCL barrier
//               before it or of the hold's start. Gives up after timeout_s and sets *timed_out = 1.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace nccl_moe::perf {

cudaError_t copyRows(void* dst, const int* dst_rows, const void* src, const int* src_rows, int num_rows,
                     size_t row_bytes, cudaStream_t stream);
cudaError_t reduceRows(uint16_t* out, const uint16_t* in, const int* rows, const float* weights, int num_tokens,
                       int fan_in, int hidden, cudaStream_t stream, const int* groups = nullptr, int num_groups = 0);
cudaError_t holdStream(int microseconds, cudaStream_t stream);
cudaError_t holdAndMeet(int microseconds, long long* const* peers, long long* flags, int me, int num_ranks,
                        long long epoch, double timeout_s, int* timed_out, cudaStream_t stream);

}  // namespace nccl_moe::perf
