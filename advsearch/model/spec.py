"""The model's shape and vocabulary, and conversion between strings and token tensors.

torch is imported by the methods that make tensors, not with this module, so that `advsearch eval`
can read the spec and validate sequences on its torch-free path (`advsearch.numpy_eval`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from advsearch.errors import AdvsearchError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelSpec:
    """Shape of an attention-only first-unique-character transformer.

    `vocab` lists the characters in token order; the last one is the `?` token
    that starts every sequence and labels positions with no unique character.
    """

    vocab: str = "abcdefghij?"
    seq_len: int = 20
    d_model: int = 42
    d_head: int = 14
    n_layers: int = 2
    n_heads: int = 3
    normalization: str = "LN"

    @property
    def d_vocab(self) -> int:
        return len(self.vocab)

    @property
    def qmark(self) -> int:
        """Token id of `?`."""
        return len(self.vocab) - 1

    @property
    def n_letters(self) -> int:
        """Number of ordinary tokens (a-j for the challenge model)."""
        return len(self.vocab) - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdvsearchError(f"unknown model spec field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def for_checkpoint(cls, path: Path) -> "ModelSpec":
        """The spec in `<checkpoint>.json` (its `spec` entry, or the whole file), else the default."""
        sidecar = Path(str(path) + ".json")
        if not sidecar.exists():
            return cls()
        try:
            data = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AdvsearchError(f"cannot read model sidecar {sidecar}: {e}") from None
        return cls.from_dict(data.get("spec", data) if isinstance(data, dict) else {})

    def encode(self, text: str) -> torch.Tensor:
        """`'?abc'` -> tensor of token ids, validated against this spec."""
        import torch

        return torch.tensor(self.token_ids(text), dtype=torch.long)

    def token_ids(self, text: str) -> list[int]:
        """`'?abc'` -> list of token ids, validated against this spec (one-line AdvsearchError if invalid)."""
        if not text:
            raise AdvsearchError("empty sequence: it must start with '?'")
        bad = sorted({c for c in text if c not in self.vocab})
        if bad:
            raise AdvsearchError(
                f"unknown character(s) {''.join(bad)!r} in {text!r}; the vocabulary is {self.vocab!r}"
            )
        if text[0] != "?":
            raise AdvsearchError(f"sequence {text!r} must start with '?'")
        if len(text) > self.seq_len:
            raise AdvsearchError(f"sequence {text!r} has {len(text)} tokens; the model takes at most {self.seq_len}")
        return [self.vocab.index(c) for c in text]

    def random_tokens(self, n: int, seed: "int | torch.Generator", length: int | None = None) -> torch.Tensor:
        """n sequences of the training distribution: `?` then `length` - 1 (default seq_len - 1)
        uniform letters.

        `seed` is a seed for a private generator, which gives the same tokens as the global RNG
        after `torch.manual_seed(seed)` (the challenge's construction), or a generator to draw
        from (the caller's stream continues from where this draw leaves it).
        """
        import torch

        gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
        length = self.seq_len if length is None else length
        body = torch.randint(0, self.n_letters, (n, length - 1), generator=gen)
        return torch.cat([torch.full((n, 1), self.qmark, dtype=torch.long), body], 1)

    def decode(self, tokens) -> str:
        return "".join(self.vocab[int(t)] for t in tokens)
