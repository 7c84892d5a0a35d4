"""Training data: tokenizers, the token cache, the held-out split, JSON lines, the same batches at any world size."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megaspec import SpecError
from megaspec.train import prepare
from megaspec.train.data import CORPUS, TokenData, micro_batches, prepare_data, split_sources
from megaspec.train.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, save_tokenizer

tokenizers = pytest.importorskip("tokenizers")

TEXT = "héllo wörld\n\n  tabs\t and 日本語 🎉 \r\n end\n"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def corpus(tmp_path: Path) -> Path:
    """A text whose last lines are recognisably held out: 'VALIDATION' appears only there."""
    words = "the quick brown fox jumps over a lazy dog while seven models learn to talk".split()
    rng = np.random.default_rng(0)
    train = [" ".join(rng.choice(words, 12)) for _ in range(900)]
    held = [f"VALIDATION line {i}: " + " ".join(rng.choice(words, 8)) for i in range(100)]
    return write_lines(tmp_path / "text.txt", train + held)


def text_of(tokens: np.ndarray) -> bytes:
    """Byte-tokenizer ids (stored as uint16) back to the bytes they are."""
    return bytes(tokens.tolist())


def opts(path: Path, cache: Path, **extra: object) -> dict:
    return {"name": "text", "path": str(path), "cache_dir": str(cache), **extra}


def test_byte_tokenizer_is_a_tokenizers_document_read_back_without_the_package(tmp_path):
    byte = ByteTokenizer()
    assert byte.encode(TEXT) == list(TEXT.encode("utf-8")) and byte.decode(byte.encode(TEXT)) == TEXT
    # The saved tokenizer.json is a real `tokenizers` document that tokenizes exactly like the bytes.
    hf = tokenizers.Tokenizer.from_file(str(save_tokenizer(byte, tmp_path)))
    assert hf.encode(TEXT).ids == byte.encode(TEXT) and hf.decode(byte.encode(TEXT)) == TEXT
    assert hf.get_vocab_size() == 256
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)  # recognised: no package needed to read it


def test_bpe_round_trips_its_training_text_and_survives_save_and_load(tmp_path):
    path = corpus(tmp_path)
    prepared = prepare_data(opts(path, tmp_path / "cache", tokenizer="bpe", vocab_size=300))
    tok = prepared.tokenizer
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 300
    assert tok.encode("<|endoftext|>") == tok.end_of_text() == [0]  # the special token, first in the vocabulary
    train, held = split_sources(opts(path, tmp_path), "text")
    text = path.read_text(encoding="utf-8")
    cut = train.end
    assert tok.decode(prepared.train.tolist()) == text[:cut]  # the whole training split, token for token
    assert tok.decode(prepared.val.tolist()) == text[cut:]
    assert len(prepared.train) < cut / 2  # merges learnt: far fewer tokens than bytes
    again = load_tokenizer(save_tokenizer(tok, tmp_path / "run"))
    assert again.encode(TEXT) == tok.encode(TEXT) and again.decode(again.encode(TEXT)) == TEXT


def test_held_out_tokens_are_the_end_of_the_file_and_never_in_the_training_stream(tmp_path):
    path = corpus(tmp_path)
    data = path.read_bytes()
    cut = data.index(b"VALIDATION")
    prepared = prepare_data(opts(path, tmp_path / "cache", val_fraction=1 - cut / len(data)))
    train, held = prepared.train, prepared.val
    assert len(train) == cut and len(held) == len(data) - cut
    assert text_of(train) == data[:cut] and text_of(held) == data[cut:]
    assert b"VALIDATION" not in text_of(train)
    # Every training window comes from the training tokens: none ever holds a held-out line.
    windows = TokenData(train, 64, seed=0)
    for step in range(50):
        for row in windows.global_batch(step, 8).tolist():
            assert b"VALIDATION" not in bytes(row)


def test_a_second_preparation_reuses_the_cache_without_tokenizing(tmp_path, monkeypatch):
    path = corpus(tmp_path)
    logged: list[str] = []
    first = prepare_data(opts(path, tmp_path / "cache", tokenizer="bpe", vocab_size=300), logged.append)
    assert [m.split(" into ")[0].split(" of ")[0] for m in logged] == [
        "data: trained a byte-level BPE", f"data: tokenized {path} [train]", f"data: tokenized {path} [val]"]
    files = sorted((tmp_path / "cache").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]

    def no_tokenizing(*_: object) -> None:
        raise AssertionError("tokenized again")

    monkeypatch.setattr(prepare, "_token_arrays", no_tokenizing)
    monkeypatch.setattr(prepare, "train_bpe", no_tokenizing)
    logged.clear()
    second = prepare_data(opts(path, tmp_path / "cache", tokenizer="bpe", vocab_size=300), logged.append)
    assert logged == []
    assert sorted((tmp_path / "cache").iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert isinstance(second.train, np.memmap)  # mapped from the file, not read into memory


def test_a_changed_file_or_tokenizer_gets_new_tokens(tmp_path):
    path = corpus(tmp_path)
    a = prepare_data(opts(path, tmp_path / "cache"))
    b = prepare_data(opts(path, tmp_path / "cache", val_fraction=0.5))
    assert len(b.val) > len(a.val)
    with path.open("a", encoding="utf-8") as f:
        f.write("one more line\n")
    c = prepare_data(opts(path, tmp_path / "cache"))
    assert text_of(c.val).endswith(b"one more line\n")


def test_jsonl_documents_end_with_end_of_text(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"document {i}", "id": i}) for i in range(10)) + "\n\n")
    # 321 bytes: the cut at 79% (byte 254) moves on to the next line start, document 8's.
    prepared = prepare_data({"name": "jsonl", "path": str(docs), "cache_dir": str(tmp_path / "c"),
                             "val_fraction": 0.21})
    assert text_of(prepared.train) == b"".join(f"document {i}\n\n".encode() for i in range(8))
    assert text_of(prepared.val) == b"document 8\n\ndocument 9\n\n"
    bpe = prepare_data({"name": "jsonl", "path": str(docs), "cache_dir": str(tmp_path / "c"), "val_fraction": 0.21,
                        "tokenizer": "bpe", "vocab_size": 280})
    assert bpe.tokenizer.decode(bpe.val.tolist()) == "document 8<|endoftext|>document 9<|endoftext|>"


def test_bad_data_is_refused_with_file_and_line(tmp_path):
    docs = write_lines(tmp_path / "docs.jsonl", ['{"text": "a"}', '{"body": "b"}'])
    with pytest.raises(SpecError, match=rf"^{docs}:2: no string field 'text' \(data.text_field names it\)$"):
        prepare_data({"name": "jsonl", "path": str(docs), "cache_dir": str(tmp_path), "val_fraction": 0})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": \n')
    with pytest.raises(SpecError, match=rf"^{bad}:3: not a JSON object: "):
        prepare_data({"name": "jsonl", "path": str(bad), "cache_dir": str(tmp_path), "val_fraction": 0})
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\nfine\ncaf\xe9\n")
    with pytest.raises(SpecError, match=rf"^{latin}:3: not valid UTF-8 \(invalid continuation byte\)"):
        prepare_data(opts(latin, tmp_path, tokenizer="bpe", vocab_size=260, val_fraction=0))
    text = corpus(tmp_path)
    cases = [
        ({"tokenizer": "bpe"}, "data.tokenizer=bpe needs data.vocab_size (e.g. data.vocab_size=4096)"),
        ({"vocab_size": 512}, "data.vocab_size=512 sets the size of a trained BPE (data.tokenizer=bpe); "
                              "data.tokenizer=byte has its own vocabulary"),
        ({"val_fraction": 1.0}, "data.val_fraction must be in [0, 1), got 1.0"),
        ({"val_path": str(text), "val_fraction": 0.1}, "data.val_path and data.val_fraction=0.1 both name a "
                                                       "held-out split; give one of them"),
        ({"tokenizer": "bpe", "vocab_size": 100}, "data.vocab_size (100) must be at least 257 for a byte-level "
                                                  "BPE (256 byte tokens and <|endoftext|>)"),
        ({"tokenizer": str(tmp_path / "none")}, f"tokenizer: no such file: {tmp_path / 'none'}"),
    ]
    for extra, message in cases:
        with pytest.raises(SpecError) as info:
            prepare_data(opts(text, tmp_path / "c2", **extra))
        assert str(info.value) == message
    with pytest.raises(SpecError, match=r"^data.path: no such file: nowhere.txt$"):
        prepare_data(opts(Path("nowhere.txt"), tmp_path))
    one = write_lines(tmp_path / "one.txt", ["a single line"])
    with pytest.raises(SpecError) as info:
        prepare_data(opts(one, tmp_path))
    assert str(info.value) == (f"data.val_fraction=0.1 of {one} (14 bytes) leaves no held-out lines; "
                               "the split is cut at a line end")


def test_the_shipped_corpus_is_cached_in_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    prepared = prepare_data({"name": "text"})
    assert len(prepared.train) + len(prepared.val) == CORPUS.stat().st_size
    assert len(list((tmp_path / "megaspec" / "tokens").glob("corpus.txt-*.bin"))) == 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_one_tokenization_and_read_the_same_batches_as_one(tmp_path):
    path = corpus(tmp_path)
    options = opts(path, tmp_path / "cache", tokenizer="bpe", vocab_size=300)
    worker = Path(__file__).with_name("data_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(worker), json.dumps(options), str(tmp_path)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # Both processes prepared at once; the lock let exactly one of them train the BPE and tokenize each split.
    logs = ranks[0]["log"] + ranks[1]["log"]
    assert sum("trained a byte-level BPE" in m for m in logs) == 1
    assert sum("[train] into" in m for m in logs) == 1 and sum("[val] into" in m for m in logs) == 1
    # One process reading the same cache sees the global batches the two processes split between them.
    one = prepare_data(options)
    data = TokenData(one.train, 16, seed=0)
    for step in range(3):
        whole = data.global_batch(step, 4)  # [4, 16]
        split = [b for r in ranks for b in r["batches"][step]]  # rank 0's micro-batches, then rank 1's
        assert torch.equal(torch.cat(split), whole)
        assert [b.shape[0] for b in split] == [1, 1, 1, 1]
    assert micro_batches(data, 0, 4, 1, 1, 2)[0].tolist() == ranks[1]["batches"][0][0].tolist()
