"""Triton where it is installed, and where it is not a stand-in that lets the kernels be defined.

Triton ships for Linux only (about 1 GB installed); macOS, Windows and minimal CPU images lack it.
Every op has a torch path (:mod:`copal_kernels.naive`, bit-identical masks) that
:mod:`copal_kernels._dispatch` takes whenever ``HAS_TRITON`` is False, so the kernel modules take
``triton`` and ``tl`` from here: without Triton, ``@triton.jit`` functions are still defined (and
``tl.constexpr`` annotations evaluate), but launching one, or reaching for anything else of
Triton, raises ``RuntimeError`` naming what is missing; the dispatch never does either then.
"""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    def _missing(what: str):
        return RuntimeError(f"{what} needs Triton, which is not installed (pip install "
                            "'copal-kernels[triton]' on Linux); the torch path runs without it")

    class _Kernel:
        """A ``@triton.jit`` function that cannot be launched."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise _missing(f"the Triton kernel {self.__name__}")

        def __call__(self, *args, **kwargs):
            raise _missing(f"the Triton function {self.__name__}")

    class _Triton:
        __version__ = None

        @staticmethod
        def jit(fn=None, **options):
            return _Kernel(fn) if fn is not None else _Kernel

        def __getattr__(self, name):
            raise _missing(f"triton.{name}")

    class _Language:
        class constexpr:  # noqa: N801 (Triton's name), used in annotations and module constants
            def __init__(self, value=None):
                self.value = value

        def __getattr__(self, name):
            raise _missing(f"triton.language.{name}")

    triton = _Triton()
    tl = _Language()

__all__ = ["HAS_TRITON", "tl", "triton"]
