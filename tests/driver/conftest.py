import pytest

from .tiny import tiny_checkpoint, write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt")


@pytest.fixture(scope="session")
def corpus_b(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus_b") / "other.txt", seed=1)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COPAL_HOME", str(tmp_path / "copal-home"))


@pytest.fixture(autouse=True)
def torch_path_unless_marked(request, monkeypatch):
    """The driver's tests run the kernels' torch references (bit-identical to the Triton kernels,
    which tests/test_*.py check on every shape and dtype); those marked ``triton`` run the
    Triton kernels end to end (under the interpreter on a CPU, where it costs 10-100x)."""
    if request.node.get_closest_marker("triton") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
