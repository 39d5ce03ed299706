"""The only package that talks to llama.cpp (through llama-cpp-python's ctypes binding)."""

from ggufopt_ray.engine.logits import LogitsEngine, RuntimeSettings

__all__ = ["LogitsEngine", "RuntimeSettings"]
