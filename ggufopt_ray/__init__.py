"""ggufopt-ray: find the GGUF quantization that stays closest to the original model.

The package is organised by concern (see DESIGN in the README): ``gguf`` reads and makes
model files, ``engine`` owns llama.cpp, ``metrics`` holds the numeric core, ``distributed``
is the only place that imports Ray, and ``cli`` exposes every stage as ``ggufopt <command>``.
"""

__version__ = "0.1.0"
