"""The original's improvement list: clean-up stage, adaptive persistence,
hierarchical banks. Each was measured before it was kept (BENCHMARKS.md)."""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from ..errors import ArgumentError, DTypeError, FormatError, ShapeError, _shown
from ._checks import as_keys, check_finite, check_int, check_values
from .bank import MembraneBank, _check_lambda, _is_real, _OwnLock

__all__ = ["AdaptivePersistence", "HierarchicalMembraneBank", "HopfieldCleanup"]


class HopfieldCleanup:
    """A modern-Hopfield clean-up stage over the stored patterns.

    One step maps a noisy recall ``y`` to ``softmax(beta * s) @ P`` where ``s``
    is the cosine similarity of the mean-centred ``y`` with each mean-centred
    stored pattern. With a large ``beta`` this snaps to the nearest stored
    pattern, which extends recall of a correlation readout past ``K = L``
    (where crosstalk is as large as the signal). The clean-up memory holds the
    patterns themselves (``P * H * W`` numbers).

    Args:
        patterns: ``(P, H, W)`` or ``(P, D)`` float tensor of stored patterns,
            finite (a NaN or Inf would make every decode NaN, as
            :meth:`MembraneBank.store` refuses them).
        beta: Inverse temperature (larger: closer to a hard nearest neighbour).
    """

    def __init__(self, patterns: torch.Tensor, beta: float = 64.0) -> None:
        if not isinstance(patterns, torch.Tensor):
            raise ArgumentError(
                f"patterns must be a floating torch.Tensor; got {type(patterns).__name__}"
            )
        if not patterns.is_floating_point():
            raise DTypeError(f"patterns must be a floating torch.Tensor; got {patterns.dtype}")
        if patterns.ndim not in (2, 3) or patterns.shape[0] == 0:
            raise ShapeError(
                f"patterns must have shape (P, H, W) or (P, D); got {tuple(patterns.shape)}"
            )
        bad = ~torch.isfinite(patterns.detach())
        if bool(bad.any()):
            raise ArgumentError(
                f"patterns must be finite; got {int(bad.sum())} NaN or Inf entries "
                f"(the first in pattern {int(bad.flatten(1).any(1).nonzero()[0])})"
            )
        if not (_is_real(beta) and 0 < beta < math.inf):
            # beta = inf makes softmax(inf * s) NaN: use a large finite beta instead
            raise ArgumentError(f"beta must be a positive finite number; got {_shown(beta)}")
        self.shape = tuple(patterns.shape[1:])
        self.patterns = patterns.detach().reshape(patterns.shape[0], -1)
        self.beta = float(beta)
        self._unit = _unit(self.patterns)

    def similarity(self, y: torch.Tensor) -> torch.Tensor:
        """Mean-centred cosine similarity of ``y`` (``(..., *shape)``) with each pattern.

        Returns ``(..., P)``.
        """
        if not isinstance(y, torch.Tensor):  # (an AttributeError on .to before)
            raise ArgumentError(f"y must be a torch.Tensor; got {type(y).__name__}")
        if tuple(y.shape[y.ndim - len(self.shape) :]) != self.shape:
            raise ShapeError(
                f"y must have shape (..., {', '.join(map(str, self.shape))}); got {tuple(y.shape)}"
            )
        lead = y.shape[: y.ndim - len(self.shape)]
        # math.prod, not -1: a batch of zero patterns has no size to infer
        u = self._unit
        flat = y.reshape(math.prod(lead), u.shape[1]).to(u.device, u.dtype)
        return (_unit(flat) @ u.T).reshape(*lead, u.shape[0])

    def nearest(self, y: torch.Tensor) -> torch.Tensor:
        """Index of the most similar stored pattern, ``(...,)`` int64."""
        return self.similarity(y).argmax(-1)

    def decode(
        self,
        bank: MembraneBank,
        iters: int = 3,
        offset: torch.Tensor | None = None,
        index: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Recalls every stored key of ``bank`` jointly, past ``K = L``.

        Reads each stored key (correlation readout, unscaled by its alpha),
        snaps it to the nearest stored pattern, subtracts the crosstalk those
        estimates predict (``sum_j G_jk alpha_j P_j / alpha_k``) and repeats
        ``iters`` times: a Hopfield step with interference cancellation. Works
        best with low-coherence codes (``codes="auto"``) and mean-centred,
        energy-normalised storage (``store(v - offset, alphas="adaptive")``).

        Args:
            bank: A bank whose stored key ``k`` holds pattern ``k`` of this memory
                (minus ``offset``); patterns and bank share ``H, W``.
            iters: Cancellation rounds (0: a plain clean-up of the readout).
            offset: ``(H, W)`` pattern subtracted before storing (e.g. the mean).
            index: Which bank of a batched bank.

        Returns:
            ``(keys, nearest, cleaned)``: the stored keys ``(S,)``, the index of
            the recalled pattern for each ``(S,)``, and the cleaned recalls
            ``(S, H, W)`` (a final soft Hopfield step).
        """
        check_int("iters", iters, minimum=0)
        check_int("index", index, minimum=0)
        if index >= bank.B:
            raise ArgumentError(f"index must be in [0, {bank.B}); got {index}")
        if self.shape != (bank.H, bank.W):
            raise ShapeError(
                f"bank must hold patterns of shape {self.shape}; got ({bank.H}, {bank.W})"
            )
        stored = [k for k in bank.stored_keys() if int(bank.counts[index, k]) > 0]
        if not stored:
            raise ArgumentError("bank holds no stored keys to decode")
        keys = torch.tensor(stored)
        off = torch.zeros(bank.H, bank.W, dtype=bank.dtype, device=bank.device)
        if offset is not None:
            if tuple(offset.shape) != (bank.H, bank.W):
                raise ShapeError(
                    f"offset must have shape ({bank.H}, {bank.W}); got {tuple(offset.shape)}"
                )
            off = offset.to(bank.device, bank.dtype)
        y0 = bank.read(keys, readout="correlation", unscale=True)[index] + off
        cs = bank.C[:, keys.to(bank.device)]
        g = cs.T @ cs
        g = g - torch.diag(torch.diag(g))
        a = bank.gains[index, keys.to(bank.device)]
        pats = self.patterns.reshape(-1, *self.shape).to(bank.device, bank.dtype)
        y = y0
        for _ in range(iters):
            est = (pats[self.nearest(y).to(bank.device)] - off) * a[:, None, None]
            y = y0 - torch.einsum("jk,jhw->khw", g, est) / a[:, None, None]
        return keys, self.nearest(y), self(y)

    def __call__(self, y: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """Cleans ``y`` with ``steps`` Hopfield updates; same shape as ``y``."""
        check_int("steps", steps)
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            # the result is a mix of patterns cast to y's dtype: integers would truncate it
            raise DTypeError(f"y must be a floating torch.Tensor; got {getattr(y, 'dtype', y)!r}")
        out = y
        for _ in range(steps):
            p = torch.softmax(self.beta * self.similarity(out), dim=-1)
            out = (p @ self.patterns.to(p.dtype)).reshape(y.shape).to(y.device, y.dtype)
        return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class AdaptivePersistence:
    """Decay by access count: keys read often fade slower.

    Each :meth:`step` multiplies key ``k``'s pattern in bank ``b`` by
    ``lam_bk = min(base + (1 - base) * reads_bk / saturation, max_lambda)``,
    using the dual codes to isolate each key's component (exact while the
    stored keys' codes are linearly independent, i.e. at most ``L`` of them).

    Args:
        bank: The bank to decay; its ``reads`` counts drive the rates.
        base_lambda: Decay of a key never read, in (0, 1].
        max_lambda: Ceiling of the decay factor, in [base_lambda, 1].
        saturation: Reads after which a key reaches ``max_lambda`` (at most).
    """

    def __init__(
        self,
        bank: MembraneBank,
        base_lambda: float = 0.95,
        max_lambda: float = 0.99,
        saturation: int = 100,
    ) -> None:
        if not isinstance(bank, MembraneBank):
            raise ArgumentError(f"bank must be a MembraneBank; got {type(bank).__name__}")
        self.bank = bank
        self.base_lambda = _check_lambda(base_lambda, "base_lambda")
        self.max_lambda = _check_lambda(max_lambda, "max_lambda")
        if self.max_lambda < self.base_lambda:
            raise ArgumentError(
                f"max_lambda must be >= base_lambda={base_lambda}; got {max_lambda}"
            )
        check_int("saturation", saturation)
        self.saturation = int(saturation)

    def lambdas(self) -> torch.Tensor:
        """The per-key decay factors now: ``(B, K)`` float64 CPU tensor."""
        r = self.bank.reads.double()
        lam = self.base_lambda + (1 - self.base_lambda) * r / self.saturation
        return lam.clamp(max=self.max_lambda)

    def step(self, n: int = 1) -> None:
        """Applies ``n`` steps of per-key decay (rates fixed for the ``n`` steps)."""
        check_int("n", n, minimum=0)
        bank = self.bank
        with bank._lock:  # an in-place update of the shared state, like MembraneBank.store
            stored = bank.stored_keys()
            if not stored or n == 0:
                return
            dual = bank._dual_for(None if bank.K <= bank.L else torch.tensor(stored))
            idx = torch.tensor(stored, device=bank.device)
            f = (self.lambdas()[:, stored] ** n - 1).to(bank.device, bank.dtype)  # (B, S)
            m3 = bank.M.view(bank.B, bank.L, -1)
            y = torch.matmul(dual[:, idx].T, m3)  # (B, S, N): each key's component
            cs = bank.C[:, idx].unsqueeze(0) * f.unsqueeze(1)  # (B, L, S)
            if bank._grad(cs, y):
                # out of place, as MembraneBank.store: the state may be a leaf
                # that requires grad, which autograd refuses to update in place
                bank.M = torch.baddbmm(m3, cs, y).view_as(bank.M)
            else:
                m3.baddbmm_(cs, y)
            bank.steps += n


class HierarchicalMembraneBank(_OwnLock):
    """Levels of banks with ``L, L/2, L/4, ...`` layers; global keys fill them in order.

    Key ``k`` lives in the first level whose cumulative capacity exceeds it:
    keys ``0 .. L-1`` in level 0, ``L .. L + L/2 - 1`` in level 1, and so on.
    Each level is a :class:`MembraneBank` (same ``H, W``, codes, readout),
    so every level keeps exact recall with orthogonal codes. With
    ``persistence``, every :meth:`store` ages every level by one step, as in
    one flat bank. :meth:`store`, :meth:`read`, :meth:`decay` and :meth:`clear`
    hold the bank's lock, so a read never sees a store half done.

    Args:
        L: Layers of level 0 (divisible by ``2^(levels-1)``).
        H: Pattern height.
        W: Pattern width.
        levels: Number of levels.
        **kwargs: Passed to each :class:`MembraneBank` (batch, codes, readout, device, dtype...).
    """

    def __init__(self, L: int, H: int, W: int, levels: int = 3, **kwargs: Any) -> None:
        check_int("levels", levels)
        check_int("L", L)
        if L % (1 << (levels - 1)):
            raise ArgumentError(f"L must be divisible by 2^(levels-1)={1 << (levels - 1)}; got {L}")
        self.banks = [MembraneBank(L >> i, H, W, **kwargs) for i in range(levels)]
        self.offsets = [0]
        for b in self.banks:
            self.offsets.append(self.offsets[-1] + b.K)
        self.K = self.offsets[-1]
        self.B, self.H, self.W = self.banks[0].B, H, W
        self._lock = threading.RLock()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Each bank checks itself on unpickling; the routing must match them.
        super().__setstate__(state)
        banks = self.__dict__.get("banks")
        if (
            not isinstance(banks, list)
            or not banks
            or not all(isinstance(b, MembraneBank) for b in banks)
        ):
            raise FormatError("unpickled HierarchicalMembraneBank: banks must be a list of banks")
        offsets = [0]
        for b in banks:
            offsets.append(offsets[-1] + b.K)
        if self.__dict__.get("offsets") != offsets or self.__dict__.get("K") != offsets[-1]:
            raise FormatError(
                f"unpickled HierarchicalMembraneBank: offsets must be {offsets} for its banks; "
                f"got {self.__dict__.get('offsets')}"
            )

    def _route(self, keys: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        out = []
        for i in range(len(self.banks)):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            pos = torch.nonzero((keys >= lo) & (keys < hi)).flatten()
            if pos.numel():
                out.append((i, pos, keys[pos] - lo))
        return out

    def store(self, values: torch.Tensor, keys: Any, alphas: Any = None) -> None:
        """Stores ``(K', H, W)`` or ``(B, K', H, W)`` values under global 1-D ``keys``.

        ``values``, ``keys`` and ``alphas`` are checked as by
        :meth:`MembraneBank.store` before any level is written: a call that
        raises leaves every level unchanged.
        """
        b0 = self.banks[0]  # every level shares B, H, W, dtype and device
        v4 = check_values(values, b0)
        kp = v4.shape[1]
        k = as_keys(keys, kp, self.B, self.K, "keys")
        if k is None:
            raise ShapeError("keys must be a 1-D sequence of global keys for a hierarchical bank")
        if k.ndim != 1:
            raise ShapeError(
                f"keys must be a 1-D sequence of global keys for a hierarchical bank; "
                f"got shape {tuple(k.shape)}"
            )
        a = b0._alphas(alphas, v4, kp)  # (B, K') or None; checks shape, device, dtype
        check_finite(v4, a, isinstance(alphas, str))
        # check_values took numpy arrays too: select from the tensor it made of them
        src = values if isinstance(values, torch.Tensor) else v4
        with self._lock:
            touched = set()
            for i, pos, local in self._route(k):
                p = pos.to(src.device)
                ai = alphas if a is None or isinstance(alphas, str) else a.index_select(1, p)
                self.banks[i].store(src.index_select(-3, p), local, ai)
                touched.add(i)
            # Automatic persistence ages every pattern once per store, whichever
            # level the store's keys live in (as in one flat bank).
            for i, bank in enumerate(self.banks):
                if i not in touched and bank.persistence not in (None, 1.0):
                    bank.step(1)

    def read(self, keys: Any = None, **kwargs: Any) -> torch.Tensor:
        """Recalls global ``keys`` (default all): ``(B, K', H, W)``."""
        k = as_keys(keys if keys is not None else range(self.K), None, self.B, self.K, "keys")
        assert k is not None
        if k.ndim != 1:
            raise ShapeError("keys must be a 1-D sequence of global keys for a hierarchical bank")
        b0 = self.banks[0]
        out = torch.empty(self.B, k.shape[0], self.H, self.W, device=b0.device, dtype=b0.dtype)
        with self._lock:  # every level read between the same two stores
            for i, pos, local in self._route(k):
                out[:, pos.to(out.device)] = self.banks[i].read(local, **kwargs)
        return out

    def decay(self, lam: float, steps: int = 1) -> None:
        with self._lock:
            for b in self.banks:
                b.decay(lam, steps)

    def clear(self) -> None:
        with self._lock:
            for b in self.banks:
                b.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "levels": [b.stats() for b in self.banks],
            "K": self.K,
            "bytes": sum(b.M.numel() * b.M.element_size() for b in self.banks),
        }
