"""How it runs and streams: runners (one graph on one backend) and the Stream that owns the state."""

from .cuda_graph_runner import CudaGraphRunner
from .runner import BaseRunner, check_feed
from .stream import Stream
from .torch_runner import TorchRunner

__all__ = ["BaseRunner", "TorchRunner", "CudaGraphRunner", "Stream", "check_feed"]
