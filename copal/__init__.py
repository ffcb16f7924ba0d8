"""copal: the driver that prunes LLaMA-family checkpoints continually on top of copal_kernels."""

__version__ = "0.1.0"
