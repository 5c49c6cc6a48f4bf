"""The shared text-data layer: file encodings, the max_seq_length limit check and withheld test labels."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from flexlora_pl.data import GLUEDataModule, check_encoding, load_data_files
from flexlora_pl.data import files as files_module

# Five plain rows, then one whose text holds an "é": in latin-1 that is the single byte 0xe9, invalid in UTF-8.
ROWS = [{"sentence": f"row {i} is fine", "label": i % 2} for i in range(5)] + [{"sentence": "café au lait",
                                                                                "label": 0}]


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep the Arrow files `datasets` writes out of the user's cache, and never try the network.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def write_latin1(path: Path) -> str:
    """``ROWS`` in ``path``'s format, encoded as latin-1 (the JSON keeps "é" literal, not ``\\u00e9``)."""
    if path.suffix in (".csv", ".tsv"):
        sep = "," if path.suffix == ".csv" else "\t"
        text = "sentence" + sep + "label\n" + "".join(f"{r['sentence']}{sep}{r['label']}\n" for r in ROWS)
    elif path.suffix == ".jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS)
    else:
        text = json.dumps(ROWS, ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    return str(path)


@pytest.mark.parametrize("ext", ["csv", "tsv", "json", "jsonl"])
def test_file_in_another_encoding_is_named_with_the_byte_and_the_fix(ext: str, tmp_path: Path):
    path = write_latin1(tmp_path / f"latin1.{ext}")
    with pytest.raises(ValueError, match="is not valid utf-8 text") as info:
        load_data_files(path, split="train")
    message = str(info.value)
    offset = Path(path).read_bytes().index(b"\xe9")
    assert path in message and "split 'train'" in message
    assert f"byte(s) e9 at byte offset {offset}" in message
    # The JSON array is one line; the others have the bad row on line 7 (CSV/TSV header + 6) or 6 (JSON Lines).
    assert {"csv": "line 7", "tsv": "line 7", "json": "line 1", "jsonl": "line 6"}[ext] in message
    assert "caf\ufffd au lait" in message  # the surroundings, to find the row
    assert "set data.init_args.encoding" in message.lower() and "latin-1" in message

    rows = load_data_files(path, split="train", encoding="latin-1")
    assert rows["sentence"] == [row["sentence"] for row in ROWS]  # "café" decoded right, not garbled
    assert rows["label"] == [row["label"] for row in ROWS]


def test_decoding_check_finds_the_same_place_across_read_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = write_latin1(tmp_path / "latin1.csv")
    with pytest.raises(ValueError) as whole:
        load_data_files(path)
    monkeypatch.setattr(files_module, "_DECODE_CHUNK", 3)  # the bad byte lands mid-way in a tiny chunk
    with pytest.raises(ValueError) as chunked:
        load_data_files(path)
    assert str(chunked.value) == str(whole.value)
    # A character cut off by the end of the file is held back across chunks; its position stays exact.
    cut = tmp_path / "cut.csv"
    cut.write_bytes(b"sentence,label\nok \xe2\x98\x95,1\nbad,0\xe2\x98")
    with pytest.raises(ValueError, match=r"byte\(s\) e2 98 at byte offset 29 \(line 3, near 'bad,0\ufffd'\)"):
        load_data_files(str(cut))


def test_utf16_file_gets_the_utf16_hint(tmp_path: Path):
    path = tmp_path / "utf16.csv"
    path.write_text("sentence,label\nthé,1\n", encoding="utf-16")
    with pytest.raises(ValueError, match="byte-order mark: set data.init_args.encoding to utf-16"):
        load_data_files(str(path))
    assert load_data_files(str(path), encoding="utf-16")["sentence"] == ["thé"]


def test_utf8_text_and_parquet_load_unchanged(tmp_path: Path):
    frame = pd.DataFrame({"sentence": ["café ☕", "naïve"], "label": [1, 0]})
    frame.to_csv(tmp_path / "utf8.csv", index=False)  # pandas writes UTF-8
    frame.to_parquet(tmp_path / "rows.parquet", index=False)
    assert load_data_files(str(tmp_path / "utf8.csv"))["sentence"] == ["café ☕", "naïve"]
    # Parquet stores its own text encoding; the option does not apply to it.
    assert load_data_files(str(tmp_path / "rows.parquet"), encoding="latin-1")["sentence"] == ["café ☕", "naïve"]


@pytest.mark.parametrize("name", ["utf-9", "base64", ""])
def test_unknown_encoding_is_refused_up_front(name: str, tiny_tokenizer_dir: str, tmp_path: Path):
    with pytest.raises(ValueError, match=rf"encoding='{name}' is not a known text encoding.*'latin-1'"):
        check_encoding(name)
    with pytest.raises(ValueError, match=rf"encoding='{name}' is not a known text encoding"):
        GLUEDataModule("cola", tiny_tokenizer_dir, encoding=name)
    with pytest.raises(ValueError, match="not a known text encoding"):
        load_data_files(write_latin1(tmp_path / "rows.csv"), encoding=name)
    assert check_encoding("Latin-1") == "Latin-1" and check_encoding("cp1252") == "cp1252"


def test_check_max_seq_length(tiny_tokenizer_dir: str):
    dm = GLUEDataModule("cola", tiny_tokenizer_dir, max_seq_length=128)
    dm.check_max_seq_length(128, "the backbone's max_position_embeddings")  # equal is fine
    dm.check_max_seq_length(10**30, "the tokenizer's model_max_length")  # the "no known limit" sentinel
    with pytest.raises(ValueError) as info:
        dm.check_max_seq_length(64, "the backbone's max_position_embeddings")
    assert str(info.value) == ("max_seq_length=128 exceeds the limit of 64 set by the backbone's "
                               "max_position_embeddings: inputs that long do not fit. Set "
                               "data.init_args.max_seq_length to 64 or less.")


def test_max_seq_length_above_the_tokenizer_limit_is_refused_before_any_data_loads(tmp_path: Path,
                                                                                    tiny_tokenizer_dir: str):
    from transformers import AutoTokenizer

    limited = str(tmp_path / "tok32")
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir, model_max_length=32).save_pretrained(limited)
    missing = {"train": str(tmp_path / "no_such.csv"), "validation": str(tmp_path / "no_such.csv")}
    dm = GLUEDataModule("cola", limited, data_files=missing, max_seq_length=64)
    # The tokenizer is checked first, so the length problem is reported rather than the missing file.
    with pytest.raises(ValueError, match=r"max_seq_length=64 exceeds the limit of 32 set by the model_max_length "
                                         r"of the tokenizer '.*tok32'.*max_seq_length to 32 or less"):
        dm.prepare_data()
    with pytest.raises(ValueError, match="exceeds the limit of 32"):
        _ = dm.tokenizer  # also on direct use, every time
    assert GLUEDataModule("cola", limited, max_seq_length=32).tokenizer.model_max_length == 32
    # The tiny tokenizer has no known limit (a huge sentinel), so any length passes.
    assert GLUEDataModule("cola", tiny_tokenizer_dir, max_seq_length=100_000).tokenizer is not None


def test_labels_withheld(tmp_path: Path, tiny_tokenizer_dir: str):
    def csv(name: str, labels: list[int] | None) -> str:
        frame = pd.DataFrame({"sentence": ["the movie is good", "a bad film", "i love this story"]})
        if labels is not None:
            frame["label"] = labels
        frame.to_csv(tmp_path / name, index=False)
        return str(tmp_path / name)

    files = {"train": csv("train.csv", [0, 1, 0]), "validation": csv("dev.csv", [1, 0, 1])}
    for test_file, withheld in ((csv("hidden.csv", [-1, -1, -1]), True), (csv("unlabelled.csv", None), True),
                                (csv("labelled.csv", [1, 1, 0]), False)):
        dm = GLUEDataModule("cola", tiny_tokenizer_dir, data_files={**files, "test": test_file})
        with pytest.raises(RuntimeError, match="split 'test' is not loaded"):
            dm.labels_withheld("test")
        dm.prepare_data()  # checked raw rows answer too
        assert dm.labels_withheld("test") is withheld
        dm.setup("test")
        assert "test" in dm.datasets and dm.labels_withheld("test") is withheld
        assert dm.labels_withheld("validation") is False


def test_a_tokenizer_path_that_is_no_folder_is_named_not_the_hub_s_repo_id_error(tmp_path: Path):
    # through `flexlora` the model's folder is linked here and the model names it first; in Python it is this check
    data = GLUEDataModule("mrpc", tokenizer_name_or_path=str(tmp_path / "no_such_tokenizer"))
    with pytest.raises(ValueError, match=r"no_such_tokenizer' is not an existing folder; give the folder that holds "
                                         r"the tokenizer files"):
        _ = data.tokenizer
