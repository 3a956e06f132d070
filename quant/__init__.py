"""quant: weight formats - GGUF I/O, block quantization formats, DeepSeek FP8 - numpy only."""

from .fp8 import dequantize_fp8_blocks, quantize_fp8_blocks
from .formats import dequantize, quantize

__all__ = ["dequantize_fp8_blocks", "quantize_fp8_blocks", "quantize", "dequantize"]
