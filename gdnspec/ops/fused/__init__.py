"""Fused Triton kernels of the decode and verify steps (issue 9), each beside its torch reference.

    elementwise.py   add_rms_norm (residual add + RMSNorm, one kernel), silu_mul (SwiGLU activation)
    gemv.py          small-batch GEMV / skinny GEMM (split-K partial sums), and the GEMVs with the residual add
                     (linear_residual) or the RMSNorm (normed_linear) folded in
    normed.py        NormedInput / ResidualProjection: the layers' add_norm + input projections use the folded GEMVs
                     (no add_rms_norm launch between two GEMVs), falling back to add_rms_norm where they cannot run
    gdn_decode.py    the whole GDN token mixer between in-projection and out-projection in ONE kernel:
                     conv update + gates + q/k L2 norm + recurrence + gated RMSNorm, reading the fused projection row
    attention.py     gated attention: q/k norm + RoPE + KV write in one kernel, then split-K (flash-decoding)
                     attention over the cache with the tree ancestor mask and the sigmoid output gate fused

Every kernel runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI tests them); the references
(`*_reference`) are plain torch in float32 and define the results. Shapes a kernel cannot run raise ValueError
naming the shape before any launch.
"""
