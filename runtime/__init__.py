"""How it runs and streams: runners (one graph on one backend) and the Stream that owns the state."""

from .runner import BaseRunner, check_feed
from .stream import Stream
from .torch_runner import TorchRunner

__all__ = ["BaseRunner", "TorchRunner", "Stream", "check_feed"]
