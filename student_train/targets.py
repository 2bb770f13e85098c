"""Teacher targets kept sparse from the label store to the loss.

A stored view's soft label is its top-k class ids, their probabilities and the residual mass
the other C - k classes share evenly (docs/format.md). The DataLoader workers keep it in that
form (``labelstore.normalize_topk``: renormalised, float64, k + 1 numbers a sample) and the
dense (B, C) row is scattered on the device, in the loss: per sample the workers send
16 k + 8 bytes instead of 4 C (k = 10: 168 bytes instead of 4,000 at C = 1,000 or 87,364 at
C = 21,841). ``SparseTargets.dense`` is ``labelstore.densify`` bit for bit: the
renormalisation happens once, in numpy, and the device only divides the residual by
C - k and scatters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

import labelstore


@dataclass(frozen=True, eq=False)   # tensors: compare .dense() or the fields, not the object
class SparseTargets:
    """Top-k teacher distributions of a batch (or of one sample): the dense row of each is
    ``probs`` at ``indices`` and ``residual / (C - k)`` at every other class, k the row's
    ids that are not ``-1``.

    Parameters
    ----------
    indices : Tensor
        ``(B, K)`` int64 class ids (``(K,)`` for one sample); ``-1`` pads a row whose store
        keeps fewer than K (stores of different k in one batch), or stands for a class
        listed again later in the row (``labelstore.normalize_topk``).
    probs : Tensor
        ``(B, K)`` float64 probabilities (0 where padded).
    residual : Tensor
        ``(B,)`` float64 mass of the classes outside the row's top-k (0 when k = C).
    num_classes : int
        C.
    padded : bool, optional
        Whether any slot is ``-1`` (None: look when needed, a device sync on a GPU; the
        constructors here know it).

    Notes
    -----
    The parts are renormalised (top-k plus residual sum to 1, ``labelstore.normalize_topk``);
    float64 so that :meth:`dense` in float32 rounds once, as ``labelstore.densify`` does.

    Examples
    --------
    >>> import labelstore, numpy as np
    >>> t = SparseTargets.from_topk(np.array([[3, 1]]), np.array([[0.5, 0.25]]),
    ...                             np.array([0.25]), num_classes=4)
    >>> t.dense().tolist()
    [[0.125, 0.25, 0.125, 0.5]]
    >>> np.array_equal(t.dense().numpy(), labelstore.densify(
    ...     np.array([[3, 1]]), np.array([[0.5, 0.25]]), np.array([0.25]), 4))
    True
    """

    indices: Tensor
    probs: Tensor
    residual: Tensor
    num_classes: int
    padded: Optional[bool] = None

    @classmethod
    def from_topk(cls, indices: Any, probs: Any, residual: Any,
                  num_classes: int) -> "SparseTargets":
        """Targets of stored top-k ``(n, k)`` ids and probabilities and ``(n,)`` residuals
        (what ``LabelStore.read`` gives for one view), renormalised."""
        ids, top, tail = labelstore.normalize_topk(np.asarray(indices), np.asarray(probs),
                                                   np.asarray(residual), int(num_classes))
        return cls(torch.from_numpy(ids), torch.from_numpy(top), torch.from_numpy(tail),
                   int(num_classes), bool((ids < 0).any()))

    @classmethod
    def from_logits(cls, indices: Any, logits: Any, log_partition: Any, num_classes: int,
                    temperature: float = 1.0) -> "SparseTargets":
        """Targets of stored top-k logits and log-partitions at the store's temperature
        (``labelstore.topk_from_logits``; ``dense()`` is ``labelstore.densify_logits``)."""
        top, tail = labelstore.topk_from_logits(np.asarray(logits), np.asarray(log_partition),
                                                temperature)
        return cls.from_topk(indices, top, tail, num_classes)

    @classmethod
    def stack(cls, items: Sequence["SparseTargets"]) -> "SparseTargets":
        """One batch of single-sample targets (``(K,)`` each), padded to the largest K."""
        if not items:
            raise ValueError("no targets to stack")
        classes = {item.num_classes for item in items}
        if len(classes) != 1:
            raise ValueError(f"targets of different class counts in one batch: {sorted(classes)}")
        width = max(item.indices.shape[-1] for item in items)
        indices = torch.full((len(items), width), -1, dtype=torch.int64)
        probs = torch.zeros((len(items), width), dtype=torch.float64)
        for row, item in enumerate(items):
            k = item.indices.shape[-1]
            indices[row, :k], probs[row, :k] = item.indices, item.probs
        return cls(indices, probs, torch.stack([item.residual.reshape(()) for item in items]),
                   classes.pop(), bool((indices < 0).any()))

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense shape: ``(B, C)``, or ``(C,)`` for one sample."""
        return (*self.indices.shape[:-1], self.num_classes)

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, rows: Any) -> "SparseTargets":
        """The targets of some rows (a mask, indices or a slice) of a batch."""
        if self.indices.ndim != 2:
            raise TypeError("index a batch of targets, not one sample's")
        return SparseTargets(self.indices[rows], self.probs[rows], self.residual[rows],
                             self.num_classes, self.padded)

    def to(self, device: Any, non_blocking: bool = False) -> "SparseTargets":
        """The same targets on ``device``."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return SparseTargets(move(self.indices), move(self.probs), move(self.residual),
                             self.num_classes, self.padded)

    def pin_memory(self) -> "SparseTargets":
        """Page-locked copies (the DataLoader's ``pin_memory=True`` calls this)."""
        return SparseTargets(self.indices.pin_memory(), self.probs.pin_memory(),
                             self.residual.pin_memory(), self.num_classes, self.padded)

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense distributions ``(B, C)`` (``(C,)`` for one sample) on the targets'
        device: ``labelstore.densify`` (``dtype`` float32) bit for bit.

        Returns
        -------
        Tensor
            Rows summing to 1 up to ``dtype``'s rounding.
        """
        indices, probs, residual = self.indices, self.probs, self.residual
        one = indices.ndim == 1
        if one:
            indices, probs, residual = indices[None], probs[None], residual.reshape(1)
        kept = (indices >= 0).sum(dim=1)
        rest = self.num_classes - kept
        # the share of each class outside the row's top-k, divided in float64 as densify does
        fill = torch.where(rest > 0, residual / rest.clamp(min=1).to(residual.dtype),
                           torch.zeros_like(residual)).to(dtype)
        padded = bool((indices < 0).any()) if self.padded is None else self.padded
        width = self.num_classes + 1 if padded else self.num_classes
        out = torch.empty((len(indices), width), dtype=dtype, device=indices.device)
        out.copy_(fill[:, None].expand(-1, width))
        if padded:  # padded slots (-1) write into one extra column, then dropped
            out.scatter_(1, torch.where(indices < 0, self.num_classes, indices), probs.to(dtype))
            out = out[:, :self.num_classes].contiguous()
        else:
            out.scatter_(1, indices, probs.to(dtype))
        return out[0] if one else out

    def argmax(self, dim: int = -1) -> Tensor:
        """Each row's most likely class: ``dense().argmax(dim)`` (the first of tied ones)."""
        return self.dense().argmax(dim)
