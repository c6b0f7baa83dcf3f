"""Triton kernels for quantized weight math (CUDA; CPU only under TRITON_INTERPRET=1).

tiles.py dequantizes a tile of any supported format; gemv.py (decode), gemm.py (prefill) and
moe.py (routed experts) build on it; backend.py binds them into `Ops` for ds4py/quant/ops.py.
"""
