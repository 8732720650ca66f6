"""Captions to fixed-length token ids: a BERT WordPiece vocabulary file, a WordPiece tokenizer
trained on the dataset's own captions (saved as tokenizer.json), or a Stable Diffusion CLIP
tokenizer folder. Offline only."""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from ldm_jax import fileio
from ldm_jax.data.conditions import context_kind
from ldm_jax.data.sources import DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID = 0  # both kinds put [PAD] first


class TextTokenizer:
  """encode(texts) -> (N, max_length) int32, [CLS] ... [SEP] then [PAD] (id 0)."""

  def __init__(self, path: str, max_length: int):
    self.path, self.max_length = path, max_length
    if not os.path.isfile(path):
      raise DataError(f"cond.text_vocab: tokenizer file '{path}' does not exist")
    if path.endswith(".json"):
      from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
      self._fast = Tokenizer.from_file(path)
      self._fast.enable_padding(pad_id=PAD_ID, pad_token="[PAD]", length=max_length)
      self._fast.enable_truncation(max_length)
      self.vocab_size = self._fast.get_vocab_size()
      self._bert = None
      if self._fast.token_to_id("[PAD]") != PAD_ID:
        raise DataError(f"cond.text_vocab: '{path}' does not map [PAD] to id {PAD_ID}")
    else:
      from transformers import BertTokenizer  # pylint: disable=g-import-not-at-top
      # transformers 5.x: the vocabulary file goes in `vocab`; `vocab_file` is ignored.
      self._bert = BertTokenizer(vocab=path)
      with open(path, encoding="utf-8") as f:
        lines = sum(1 for line in f if line.strip())
      self.vocab_size = len(self._bert)
      if self.vocab_size < lines or self._bert.pad_token_id != PAD_ID:
        raise DataError(f"cond.text_vocab: '{path}' did not load as a BERT vocabulary "
                        f"({self.vocab_size} tokens for {lines} lines, pad id "
                        f"{self._bert.pad_token_id})")
      self._fast = None

  def encode(self, texts: Iterable[str]) -> np.ndarray:
    texts = [str(t) for t in texts]
    if self._fast is not None:
      ids = [e.ids for e in self._fast.encode_batch(texts)]
    else:
      ids = self._bert(texts, padding="max_length", truncation=True,
                       max_length=self.max_length)["input_ids"]
    return np.asarray(ids, np.int32)


CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt")


def clip_tokenizer_dir(path: str) -> str:
  """The folder of a CLIP tokenizer: `path` itself or a Stable Diffusion folder's tokenizer/."""
  for folder in (path, os.path.join(path, "tokenizer")):
    if all(os.path.isfile(os.path.join(folder, f)) for f in CLIP_TOKENIZER_FILES):
      return folder
  raise DataError(f"cond.text_vocab: '{path}' holds no CLIP tokenizer (expected "
                  f"{' and '.join(CLIP_TOKENIZER_FILES)} there or in its tokenizer/; a single-"
                  f"file checkpoint needs --tokenizer=DIR)")


class ClipTokenizer:
  """encode(texts) -> (N, max_length) int32 as Stable Diffusion pipelines tokenize prompts:
  <|startoftext|> ... <|endoftext|>, padded with the tokenizer's own pad token (SD 1.x: the
  end token; SD 2.x: '!') and truncated to max_length. Local files only."""

  def __init__(self, path: str, max_length: int = 77):
    self.path = clip_tokenizer_dir(path)
    from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
    try:
      self._tok = CLIPTokenizer.from_pretrained(self.path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
      raise DataError(f"cond.text_vocab: '{self.path}' did not load as a CLIP tokenizer: "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    self.max_length = max_length
    self.vocab_size = len(self._tok)
    self.bos_id, self.eos_id = self._tok.bos_token_id, self._tok.eos_token_id
    self.pad_id = self._tok.pad_token_id

  def encode(self, texts: Iterable[str]) -> np.ndarray:
    ids = self._tok([str(t) for t in texts], padding="max_length", truncation=True,
                    max_length=self.max_length)["input_ids"]
    return np.asarray(ids, np.int32)


def train_wordpiece(captions: Iterable[str], vocab_size: int, path: str) -> str:
  """Trains a lower-casing WordPiece tokenizer on captions and saves it to `path` (json)."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers  # pylint: disable=g-import-not-at-top,g-multiple-import
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
  tok.train_from_iterator(captions, trainer=trainer)
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
  with fileio.atomic_path(path) as tmp:   # a kill never leaves a torn tokenizer.json
    tok.save(tmp)
  return path


def tokenizer_for(cond_config, workdir: str | None, captions=None) -> TextTokenizer | None:
  """The tokenizer of a text-conditioned config (None for other routes).

  cond.text_tokenizer='vocab' reads cond.text_vocab ('clip': the CLIP tokenizer folder there);
  'train' reads <workdir>/tokenizer.json, or
  first trains it on process 0 from `captions()` (an iterable of the training captions) while
  the other hosts wait.
  """
  c = cond_config
  if context_kind(c) != "text":
    return None
  if c.text_tokenizer == "clip":
    return ClipTokenizer(c.text_vocab, c.text_max_length)
  if c.text_tokenizer == "vocab":
    return TextTokenizer(c.text_vocab, c.text_max_length)
  if workdir is None:
    raise DataError("cond.text_tokenizer='train' needs a workdir to keep the tokenizer in")
  path = os.path.join(workdir, "tokenizer.json")
  if not os.path.exists(path):
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      if captions is None:
        raise DataError(f"cond.text_tokenizer='train': '{path}' does not exist and no captions "
                        f"were given to train it on")
      train_wordpiece(captions(), c.text_vocab_size, path)
    multihost_utils.sync_global_devices("ldm_jax tokenizer")
  return TextTokenizer(path, c.text_max_length)
