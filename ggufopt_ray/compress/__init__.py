"""Floating-point compression of model weights (ZFP), as an alternative to GGUF quantization."""

from ggufopt_ray.compress.zfp import (
    ZFP_MODES,
    ErrorStats,
    TensorZfpReport,
    ZfpConfig,
    ZfpReport,
    compress_matrix,
    compress_model,
    decompress_matrix,
    error_stats,
    format_report,
    from_zfp_layout,
    select_tensors,
    to_zfp_layout,
)

__all__ = [
    "ZFP_MODES", "ErrorStats", "TensorZfpReport", "ZfpConfig", "ZfpReport", "compress_matrix", "compress_model",
    "decompress_matrix", "error_stats", "format_report", "from_zfp_layout", "select_tensors", "to_zfp_layout",
]
