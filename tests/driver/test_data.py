"""Sources, splits and windows of the standard protocol, on local files."""

import pytest
import torch

import json

from copal.data import SOURCES, DataError, load_text, make_dataset, tokenize_corpus

from .tiny import word_tokenizer


def test_windows_follow_the_protocol(corpus):
    tokenizer = word_tokenizer(96)
    ids = tokenize_corpus(str(corpus), tokenizer)
    dataset = make_dataset(str(corpus), tokenizer, num_calibration=5, num_test=3, seq_len=16)
    train, test = ids[: int(0.9 * len(ids))], ids[int(0.9 * len(ids)):]
    starts = torch.randint(0, len(train) - 16, (5,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(dataset.calibration, torch.stack([train[s:s + 16] for s in starts]))
    assert torch.equal(dataset.test, test[:48].reshape(3, 16))
    again = make_dataset(str(corpus), tokenizer, num_calibration=5, num_test=3, seq_len=16)
    assert torch.equal(again.calibration, dataset.calibration), "deterministic"


def test_folder_source_and_errors(tmp_path, corpus):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("first file.")
    (folder / "b.txt").write_text("second file.")
    assert load_text(str(folder)) == "first file.\n\nsecond file."
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        load_text(str(tmp_path / "none"))


@pytest.mark.parametrize("source,field,separator", [
    ("wikitext2", "text", "\n\n"), ("ptb", "sentence", " "), ("c4", "text", " ")])
def test_hugging_face_loaders_on_local_files(tmp_path, source, field, separator):
    pytest.importorskip("datasets")
    rows = [{field: " = Title = "}, {field: "A sentence ."}, {field: "Another one ."}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    text = SOURCES[source].load(path="json", name=None, data_files=str(path), split="train")
    assert text == separator.join(row[field] for row in rows)


def test_hugging_face_loaders_pass_their_arguments_and_explain_failure(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def unreachable(**arguments):
        calls.append(arguments)
        raise ConnectionError("the Hub cannot be reached")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    for source, repo in [("wikitext2", "Salesforce/wikitext"), ("ptb", "ptb-text-only/ptb_text_only"),
                         ("c4", "allenai/c4")]:
        with pytest.raises(DataError, match=f"could not load '{repo}'.*needs the network"):
            load_text(source)
    assert [(c["path"], c["name"], c["split"]) for c in calls] == [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
        ("ptb-text-only/ptb_text_only", "penn_treebank", "train"),
        ("allenai/c4", None, "validation")]
    assert calls[2]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
