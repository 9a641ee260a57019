"""infini-deploy: take an Infini-attention transformer from PyTorch to deployed hardware.

Subpackages: ``models`` (what is computed), ``export`` (how it becomes ONNX and
engines), ``runtime`` (how it runs and streams), ``tools`` (the command line).
"""

__version__ = "0.1.0"
