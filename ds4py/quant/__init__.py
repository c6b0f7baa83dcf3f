"""Quantized weights and the math on them.

formats.py decodes ggml blocks and holds `QTensor`; ops.py is the backend the model calls;
ref.py is the torch reference; triton/ holds the CUDA kernels.
"""

from ds4py.quant.formats import FORMATS, QTensor, quantize, random_qtensor, row_bytes
from ds4py.quant.ops import Ops

__all__ = ["FORMATS", "Ops", "QTensor", "quantize", "random_qtensor", "row_bytes"]
