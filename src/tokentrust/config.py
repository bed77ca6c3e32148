"""The run configuration's old path, kept for code outside this repository (`from tokentrust.config
import parse_set` in copies of examples/verl/prepare_gsm8k.py). It lives in `tokentrust.train.config`,
the presets in `tokentrust.train.presets`."""

from tokentrust.train.config import *  # noqa: F401,F403
from tokentrust.train.config import ConfigError, RunConfig, deep_merge, load_file, parse_set, resolve  # noqa: F401
from tokentrust.train.presets import PRESETS  # noqa: F401
