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
