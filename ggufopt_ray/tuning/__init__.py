"""Runtime-settings tuning: the batch/ubatch pair that makes all-logits generation fastest."""

from ggufopt_ray.tuning.bub import (BubConfig, BubResult, ConfigMeasurement, MemoryEstimate, ModelDims,
                                    estimate_memory, grid_bub, llama_default_config, measure_configs,
                                    search_bub, size_ladder)

__all__ = ["BubConfig", "BubResult", "ConfigMeasurement", "MemoryEstimate", "ModelDims", "estimate_memory",
           "grid_bub", "llama_default_config", "measure_configs", "search_bub", "size_ladder"]
