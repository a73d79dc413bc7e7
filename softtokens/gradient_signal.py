"""How much of a step's gradient is signal: the CoT and answer terms apart, and two halves of the batch compared.

A soft or fuzzy CoT step's score is eps / sigma per coordinate, so the CoT term's gradient carries a variance
that grows as T d / sigma^2 whatever the baseline. This splits the step's policy-gradient loss
``-(1/BG) sum A (l_cot + l_answer)`` into its CoT term and the rest (the answer term, plus the KL term when beta > 0),
and the batch's groups into two halves, each half an independent estimate of the same expected gradient. The
cosine between the halves' gradients estimates the share of signal: with g_h = s + n_h and independent noise of
equal size, E[cos] ~ |s|^2 / (|s|^2 + |n|^2), 0 for pure noise and 1 for none. The summed buffers are the step's
gradient exactly, so measuring changes no update; it costs one more backward pass per micro-batch
(``benchmarks/grad_signal.py`` measures it), hence the option ``gradient_signal``.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def halves(rows: list[int], group_size: int, groups: int) -> list[list[int]]:
    """Split row indices of a batch of ``groups`` groups into two halves: the first groups and the last (rows
    i // group_size); with one group, its first rows and its last. The split depends on the indices only, so
    every process of a run, each holding some rows, splits as one process would."""
    def second(i: int) -> bool:
        return i // group_size >= groups // 2 if groups >= 2 else i % group_size >= group_size // 2

    return [[i for i in rows if not second(i)], [i for i in rows if second(i)]]


def _scalar(x: torch.Tensor) -> float:
    return float(x.full_tensor() if isinstance(x, DTensor) else x)


class GradientSplit:
    """Accumulates each parameter's gradient per (term, half) in place of ``p.grad``; ``finish`` puts their sum
    back as ``p.grad`` and returns the step's figures."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.parts: dict[tuple[str, int], list[torch.Tensor | None]] = {}

    def take(self, term: str, half: int) -> None:
        """Move the gradients accumulated since the last call into the (term, half) buffer."""
        buf = self.parts.setdefault((term, half), [None] * len(self.params))
        for k, p in enumerate(self.params):
            if p.grad is not None:
                buf[k] = p.grad if buf[k] is None else buf[k].add_(p.grad)
                p.grad = None

    def _sum(self, keys) -> list[torch.Tensor | None]:
        out = []
        for k, p in enumerate(self.params):
            got = [self.parts[key][k] for key in keys if key in self.parts and self.parts[key][k] is not None]
            out.append(sum(got[1:], got[0].clone()) if got else None)
        return out

    @staticmethod
    def _dot(a: list, b: list) -> float:
        return sum(_scalar((x.float() * y.float()).sum()) for x, y in zip(a, b) if x is not None and y is not None)

    def _cos(self, a: list, b: list) -> float:
        den = (self._dot(a, a) * self._dot(b, b)) ** 0.5
        return self._dot(a, b) / den if den > 0 else 0.0

    def finish(self) -> dict:
        """The step's signal figures; every parameter's ``grad`` is again the whole gradient."""
        cot, answer = self._sum([("cot", 0), ("cot", 1)]), self._sum([("answer", 0), ("answer", 1)])
        first, second = self._sum([("cot", 0), ("answer", 0)]), self._sum([("cot", 1), ("answer", 1)])
        figures = {
            "signal/cot_grad_norm": self._dot(cot, cot) ** 0.5,
            "signal/answer_grad_norm": self._dot(answer, answer) ** 0.5,
            "signal/cot_answer_cosine": self._cos(cot, answer),
            "signal/cot_half_cosine": self._cos(self._sum([("cot", 0)]), self._sum([("cot", 1)])),
            "signal/answer_half_cosine": self._cos(self._sum([("answer", 0)]), self._sum([("answer", 1)])),
            "signal/half_cosine": self._cos(first, second),
        }
        for p, c, a in zip(self.params, cot, answer):  # the whole gradient: both terms, both halves
            parts = [g for g in (c, a) if g is not None]
            p.grad = sum(parts[1:], parts[0]) if parts else torch.zeros_like(p)
        self.parts.clear()
        return figures
