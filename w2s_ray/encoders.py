"""Encoders: the text of a row to a float32 vector (the embed stage's math; no Ray).

A registry keyed like the config's `embed.*.kind`. Each encoder is built once per worker
(`build(cfg, device)`) and then maps a list of texts to an `[n, dim]` float32 array, the same
bits for the same texts in the same batches on the same machine.

- `hashed` (`HashedBagOfWords`): lower-cased word tokens (`\\w+`) and their n-grams up to
  `ngrams`, each hashed with BLAKE2b (a hash that, unlike Python's `hash`, is the same in every
  process) to a bucket and a sign; counts are log-scaled (`sign · log1p|count|`) and rows
  L2-normalised. Signed feature hashing is a sparse random projection of the bag of words
  (Weinberger et al. 2009), so this is "bag of words + a projection" with nothing fitted, which
  keeps every row's vector independent of the others (no IDF over the data, no leakage from
  the test split). A row's vector does not depend on its batch.
- `hf` (`HuggingFace`): a transformer from a local directory, through `transformers`
  (imported by this encoder alone: it costs about 4 s of start-up), padded per batch, the
  last hidden states pooled (mean over real tokens, or the first token). Padding to a batch's
  longest text makes a row's bits depend on its batch partners, so the embed stage cuts rows
  into fixed parts and batches (part of its cache key): a resumed run computes the same batches.
"""

from __future__ import annotations

import re
from hashlib import blake2b
from typing import Callable, Protocol

import numpy as np
import torch

from w2s_ray.config import EncoderConfig
from w2s_ray.errors import ConfigError

TOKEN = re.compile(r"\w+")


class Encoder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


class HashedBagOfWords:
    """See the module's docstring. Measured on 2 cores (`benchmarks/bench_embed.py`)."""

    CACHE = 1 << 20  # token hashes remembered per encoder (a dict; text reuses its words)

    def __init__(self, cfg: EncoderConfig) -> None:
        self.dim, self.ngrams, self.normalize = cfg.dim, cfg.ngrams, cfg.normalize
        self._hashes: dict[str, tuple[int, float]] = {}

    def _bucket(self, gram: str) -> tuple[int, float]:
        hit = self._hashes.get(gram)
        if hit is None:
            h = int.from_bytes(blake2b(gram.encode("utf-8"), digest_size=8).digest(), "little")
            hit = (h % self.dim, 1.0 if h >> 63 else -1.0)
            if len(self._hashes) < self.CACHE:
                self._hashes[gram] = hit
        return hit

    def grams(self, text: str) -> list[str]:
        words = TOKEN.findall(text.lower())
        out = list(words)
        for n in range(2, self.ngrams + 1):
            out += [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
        return out

    def encode(self, texts: list[str]) -> np.ndarray:
        """The counts are one `bincount` over the batch's (row, bucket) indices, not a numpy
        scalar update per gram: 1.5–1.7× faster on 2 cores (5,000 texts of 20 words, dim 256
        unigrams and dim 1024 bigrams), and the same bits (float64 sums of ±1 are exact
        integers in any order)."""
        idx: list[int] = []
        signs: list[float] = []
        get, bucket, grams, dim = self._hashes.get, self._bucket, self.grams, self.dim
        for i, text in enumerate(texts):
            base = i * dim
            for gram in grams(text):
                hit = get(gram) or bucket(gram)
                idx.append(base + hit[0])
                signs.append(hit[1])
        x = np.bincount(np.asarray(idx, np.int64), weights=np.asarray(signs, np.float64), minlength=len(texts) * dim).reshape(len(texts), dim)
        x = np.sign(x) * np.log1p(np.abs(x))
        return _normalize(x) if self.normalize else x.astype(np.float32)


class HuggingFace:
    """See the module's docstring. `device`: where the model runs (the embed worker's GPU, when
    Ray gave it one)."""

    def __init__(self, cfg: EncoderConfig, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer  # the hf encoder alone needs it (4 s to import)

        self.cfg, self.device = cfg, device
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(cfg.path, local_files_only=True).to(device).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        for lo in range(0, len(texts), self.cfg.batch_size):
            batch = self.tokenizer(texts[lo:lo + self.cfg.batch_size], padding=True, truncation=True, max_length=self.cfg.max_length,
                                   return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()
            if self.cfg.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(pooled.cpu().numpy())
        x = np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
        return _normalize(x) if self.cfg.normalize else x.astype(np.float32)


ENCODERS: dict[str, Callable[[EncoderConfig, str], Encoder]] = {
    "hashed": lambda cfg, device: HashedBagOfWords(cfg),
    "hf": HuggingFace,
}


def build(cfg: EncoderConfig, device: str = "cpu") -> Encoder:
    return ENCODERS[cfg.kind](cfg, device)


def output_dim(cfg: EncoderConfig, key: str) -> int:
    """The encoder's width, known before any text is encoded (and before Ray starts): `dim` for
    `hashed`; an hf model's `hidden_size`, read from its config alone. A model that cannot be
    found is a `ConfigError` naming `key`."""
    if cfg.kind == "hashed":
        return cfg.dim
    try:
        from transformers import AutoConfig  # the hf encoder alone needs it
    except ImportError:
        raise ConfigError(f"{key}.kind: hf needs the transformers package (pip install 'w2s-ray[text]')") from None
    try:
        return int(AutoConfig.from_pretrained(cfg.path, local_files_only=True).hidden_size)
    except Exception as err:  # OSError, ValueError, KeyError: not found, not a model, no hidden_size
        raise ConfigError(f"{key}.path: {cfg.path!r} is not a Hugging Face model on this machine "
                          f"(a save_pretrained directory, or a model in the local cache): {str(err).splitlines()[0]}") from None


def save_random_bert(path: str, words: list[str], hidden: int = 24, layers: int = 2, heads: int = 2, seed: int = 0) -> str:
    """A small BERT with random weights and a word-level tokenizer over `words`, saved at `path`
    the way a user's local model is (`save_pretrained`): for the tests and the encoder benchmark,
    which must not download a model. Returns `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # the hf encoder's packages
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=2 * hidden, max_position_embeddings=512)).save_pretrained(path)
    return path
