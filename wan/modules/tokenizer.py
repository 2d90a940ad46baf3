"""The umT5 tokenizer as Wan2.1 calls it: cleaned prompts, EOS appended, padded or truncated to a
fixed length (512), with the attention mask.

Sources: a tokenizer folder (the `google/umt5-xxl` folder shipped beside the release weights, read
with transformers' AutoTokenizer as the reference does), a Wan release folder holding it, or a bare
sentencepiece `.model` file (read with sentencepiece itself). `DEBUG_TOKENIZER` is the tiny
sentencepiece model of the debug text encoder (tools/train_debug_tokenizer.py made it).
"""

import html
import re
from pathlib import Path

import ftfy
import torch

DEBUG_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "debug_spm.model"
# Where a Wan2.1 release folder keeps the tokenizer.
RELEASE_SUBFOLDER = Path("google") / "umt5-xxl"
# Plain English that any usable tokenizer maps to known pieces; a load that yields unknown ids for
# it (a vocabulary silently ignored, the wrong model) is refused.
_PROBE = "a cat walks on the beach"


def clean_prompt(text: str) -> str:
    """The reference cleaning ('whitespace' mode): fix the text encoding, unescape HTML twice
    ('&amp;amp;' -> '&'), collapse every whitespace run to one space, strip."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanTokenizer:
    """Prompts -> (ids [B, max_length], mask [B, max_length]), both torch.long.

    Each prompt is cleaned, tokenized, truncated to max_length - 1 tokens, given EOS, then padded
    with the pad id (mask 0) to max_length, as the reference's HuggingfaceTokenizer does with
    padding='max_length', truncation=True, add_special_tokens=True.
    """

    def __init__(self, path: str | Path, max_length: int = 512, clean: bool = True):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        path = Path(path)
        self.path = path
        self.max_length = max_length
        self.clean = clean
        self._sp = None
        self._hf = None
        if path.is_dir() and (path / RELEASE_SUBFOLDER).is_dir():
            path = self.path = path / RELEASE_SUBFOLDER
        if path.is_file():
            import sentencepiece

            try:
                self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            except (RuntimeError, OSError) as err:
                raise ValueError(f"{path}: not a sentencepiece model ({err})") from None
            self.pad_id, self.eos_id, self.unk_id = self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()
            self.vocab_size = self._sp.get_piece_size()
            if self.eos_id < 0 or self.pad_id < 0:
                raise ValueError(f"{path}: the sentencepiece model has no EOS or no pad id (umT5 uses pad 0, EOS 1)")
        elif path.is_dir():
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError, TypeError) as err:
                raise ValueError(f"{path}: cannot load a tokenizer from this folder ({err})") from None
            self.pad_id, self.eos_id, self.unk_id = (
                self._hf.pad_token_id,
                self._hf.eos_token_id,
                self._hf.unk_token_id,
            )
            self.vocab_size = len(self._hf)
            if self.eos_id is None or self.pad_id is None:
                raise ValueError(f"{path}: the tokenizer has no EOS or no pad token (umT5 uses pad 0, EOS 1)")
        else:
            raise ValueError(f"{path}: no such file or folder (expected a tokenizer folder or a sentencepiece .model)")
        probe = self.tokenize([_PROBE])[0]
        if self.unk_id is not None and self.unk_id in probe:
            raise ValueError(
                f"{path}: the tokenizer maps plain English ({_PROBE!r}) to unknown ids {probe}; its vocabulary "
                "is missing (transformers 5.x T5TokenizerFast(vocab_file=...) ignores the file, for one)"
            )

    @classmethod
    def debug(cls, max_length: int = 512) -> "WanTokenizer":
        """The tiny tokenizer of the debug text encoder (T5_PRESETS['debug'])."""
        return cls(DEBUG_TOKENIZER, max_length=max_length)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, cleaned if enabled, without EOS, padding or truncation."""
        if self.clean:
            texts = [clean_prompt(t) for t in texts]
        if self._sp is not None:
            return self._sp.encode(texts)
        return self._hf(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt or a list -> ids [B, max_length], mask [B, max_length] (torch.long)."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("prompts must be strings")
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for row, tokens in enumerate(self.tokenize(list(texts))):
            tokens = tokens[: self.max_length - 1] + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Ids (one row) -> text, special tokens and padding dropped."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        ids = [i for i in ids if i not in (self.pad_id, self.eos_id)]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)
