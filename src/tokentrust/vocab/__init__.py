"""Token-frequency tables: build one from a corpus, save / load it, and read rarity, buckets and
special tokens from it. The names below are the library's API (`from tokentrust.vocab import ...`)."""

from tokentrust.vocab.build import build_frequency_table  # noqa: F401
from tokentrust.vocab.table import (  # noqa: F401
    DEFAULT_EDGES,
    FORMAT_VERSION,
    RARE_MASS,
    FrequencyTable,
    TokenInfo,
    VocabMismatchError,
    num_buckets,
    rare_from,
)
from tokentrust.vocab.tokenizer import load_tokenizer, special_token_ids, tokenizer_hash  # noqa: F401
