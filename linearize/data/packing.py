"""Pack documents into fixed-length token sequences and plan reproducible batches over them.

Documents are tokenized, each followed by the end-of-sequence token, concatenated, and cut into `seq_len`
sequences (the tail shorter than `seq_len` is dropped). Batch i of a stage is a pure function of the seed and i,
so a resumed run sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LinearizeError


def pack_documents(docs: list[str], tokenizer, seq_len: int, batch: int = 256) -> torch.Tensor:
    """Tokenize and pack `docs` into a `[N, seq_len]` LongTensor."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LinearizeError("the tokenizer has no end-of-sequence token to separate packed documents")
    stream: list[int] = []
    for start in range(0, len(docs), batch):
        encoded = tokenizer(docs[start : start + batch], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise LinearizeError(f"the data holds {len(stream)} tokens, fewer than one sequence of data.seq_len={seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class PackedData:
    """Packed training and validation sequences."""

    train: torch.Tensor
    validation: torch.Tensor
    source: str

    @classmethod
    def split(cls, sequences: torch.Tensor, fraction: float, seed: int, source: str) -> PackedData:
        order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed))
        n_val = int(len(sequences) * fraction) if len(sequences) > 1 else 0
        return cls(train=sequences[order[n_val:]], validation=sequences[order[:n_val]], source=source)


@dataclass
class BatchPlan:
    """Which sequences make batch `step` of a stage, for process `rank` of `world`.

    Each epoch walks a fresh permutation seeded by (seed, epoch); the global batch of a step is split evenly
    across processes.
    """

    n_sequences: int
    batch_size: int
    seed: int
    world: int = 1
    rank: int = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def steps_for(self, tokens: int, seq_len: int) -> int:
        return max(1, -(-tokens // (self.global_batch * seq_len)))

    def indices(self, step: int) -> torch.Tensor:
        per_epoch = max(1, self.n_sequences // self.global_batch)
        epoch, position = divmod(step, per_epoch)
        perm = torch.randperm(self.n_sequences, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        if self.n_sequences < self.global_batch:
            perm = perm.repeat(-(-self.global_batch // self.n_sequences))
        start = position * self.global_batch + self.rank * self.batch_size
        return perm[start : start + self.batch_size]
