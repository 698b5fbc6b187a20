"""Peak memory of one step, split by category.

Categories (in the order a storage is attributed, first match wins):

* ``parameters``      — the model's parameters and buffers;
* ``gradients``       — storages that are some ``p.grad`` at the end of the step;
* ``optimizer_state`` — tensors in ``optimizer.state`` at the end of the step;
* ``activations``     — tensors autograd saved for the backward pass (seen
  through ``torch.autograd.graph.saved_tensors_hooks``);
* ``directions``      — random directions / perturbations, i.e. everything
  allocated while ``bpfree.estimators.directions`` draws (tangents, z);
* ``snapshot``        — SVRG's snapshot θ̃ and its mean estimate μ̃
  (``bpfree.estimators.variance.svrg``), two parameter-sized copies;
* ``temporaries``     — everything else (op outputs freed within the step,
  forward-mode tangents of activations, checkpoint segment inputs, ...).

**CPU: exact live-tensor bytes.** :class:`LiveTensorTracker` is a
``TorchDispatchMode``: every op's output storage is recorded with its size and
an allocation sequence number, and a weak reference on the storage records
when it is freed (PyTorch keeps one Python object per live storage, so the
weak reference dies exactly when the memory is released). The peak is the
maximum of the running sum of live bytes; the categories are those of the
storages live at that moment. We use this rather than
``torch.distributed._tools.mem_tracker.MemTracker``: that tool is private,
refuses repeated module calls within one tracking context (SPSA evaluates the
model 2K times), and has no notion of forward-mode tangents or random
directions. Caveats: memory held by the allocator's caches or by non-tensor
buffers (oneDNN scratch space) is not seen; non-reentrant checkpointing keeps
segment inputs alive through its own saved-tensor hooks, which take
precedence over ours, so they show up as ``temporaries``.

**CUDA:** ``torch.cuda.max_memory_allocated`` with the peak statistics reset
before the step; parameters, gradients and optimizer state are sized directly
and the rest of the peak is reported as ``other``.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bpfree.estimators import directions
from bpfree.estimators.variance.svrg import SNAPSHOTTING

# The CPU allocator (c10::alloc_cpu) aligns every storage to 64 bytes: a count of storage bytes
# can miss up to 63 bytes per live storage, so peaks closer than 64 B x (storages live at the
# peak) are not distinguishable. CUDA's caching allocator rounds to 512 B blocks and the
# statistic is one number, so there we take one 2 MiB segment as the resolution.
CPU_ALIGNMENT_BYTES = 64
CUDA_RESOLUTION_BYTES = 2 * 2**20

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "directions", "snapshot", "temporaries")


@dataclass(frozen=True)
class MemoryReport:
    """Peak bytes of a step and their split by category at that moment."""

    peak_bytes: int
    by_category: dict[str, int]
    baseline_bytes: int
    method: str
    notes: str = ""
    category_max: dict[str, int] = field(default_factory=dict)
    resolution_bytes: int = 0

    @property
    def resolution_mb(self) -> float:
        """Peaks closer than this are not distinguishable (see :func:`measure_step_memory`)."""
        return self.resolution_bytes / 2**20

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_mb": self.peak_mb,
            "baseline_bytes": self.baseline_bytes,
            "by_category_bytes": dict(self.by_category),
            "category_max_bytes": dict(self.category_max),
            "resolution_bytes": self.resolution_bytes,
            "method": self.method,
            "notes": self.notes,
        }


@dataclass
class _Record:
    nbytes: int
    born: int
    ref: weakref.ref
    died: float = float("inf")
    drawn: bool = False
    snapshot: bool = False  # SVRG's θ̃ and μ̃
    saved: bool = False
    preexisting: str | None = None


class LiveTensorTracker(TorchDispatchMode):
    """Records every storage created inside the block; see the module docstring."""

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self._records: dict[int, _Record] = {}
        self._all: list[_Record] = []
        self._clock = itertools.count()
        self._live = 0
        self.peak_bytes = 0
        self._peak_at = -1
        self._hooks: Any = None

    # -- registration -------------------------------------------------------
    def _register(self, t: torch.Tensor, preexisting: str | None = None) -> None:
        if not _has_storage(t):
            return
        st = t.untyped_storage()
        key = id(st)
        rec = self._records.get(key)
        if rec is not None and rec.ref() is st:
            return
        born = next(self._clock)
        rec = _Record(st.nbytes(), born, weakref.ref(st, lambda _, k=key: self._release(k)),
                      drawn=directions.DRAWING.get(), snapshot=SNAPSHOTTING.get(), preexisting=preexisting)
        self._records[key] = rec
        self._all.append(rec)
        self._live += rec.nbytes
        if self._live > self.peak_bytes:
            self.peak_bytes, self._peak_at = self._live, born

    def _release(self, key: int) -> None:
        rec = self._records.pop(key, None)
        if rec is not None:
            rec.died = next(self._clock)
            self._live -= rec.nbytes

    def _mark_saved(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            rec = self._records.get(id(t.untyped_storage()))
            if rec is not None:
                rec.saved = True
        return t

    # -- context ------------------------------------------------------------
    def __enter__(self) -> "LiveTensorTracker":
        if self.model is not None:
            for t in itertools.chain(self.model.parameters(), self.model.buffers()):
                self._register(t, "parameters")
                if isinstance(t, nn.Parameter) and t.grad is not None:
                    self._register(t.grad, "gradients")
        for t in _optimizer_tensors(self.optimizer):
            self._register(t, "optimizer_state")
        self.baseline_bytes = self._live
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._mark_saved, lambda t: t)
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._hooks.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output that shares an input's storage (views, in-place ops) allocated
        # nothing; one whose storage predates the step is not the step's memory.
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _has_storage(t)}
        for t in tree_leaves(out):
            if _has_storage(t) and id(t.untyped_storage()) not in inputs:
                self._register(t)
        return out

    # -- report -------------------------------------------------------------
    def report(self) -> MemoryReport:
        """Categories of the storages live at the peak, attributed with end-of-step knowledge."""
        grads = set()
        if self.model is not None:
            grads = {id(p.grad.untyped_storage()) for p in self.model.parameters() if p.grad is not None}
        state = {id(t.untyped_storage()) for t in _optimizer_tensors(self.optimizer)}
        by_cat = dict.fromkeys(CATEGORIES, 0)
        cat_max = dict.fromkeys(CATEGORIES, 0)
        events: list[tuple[int, int, str]] = []
        live_at_peak = 0
        for rec in self._all:
            st = rec.ref()
            cat = _category(rec, None if st is None else id(st), grads, state)
            if rec.born <= self._peak_at < rec.died:
                by_cat[cat] += rec.nbytes
                live_at_peak += 1
            events.append((rec.born, rec.nbytes, cat))
            if rec.died != float("inf"):
                events.append((int(rec.died), -rec.nbytes, cat))
        running = dict.fromkeys(CATEGORIES, 0)
        for _, nbytes, cat in sorted(events, key=lambda e: e[0]):
            running[cat] += nbytes
            cat_max[cat] = max(cat_max[cat], running[cat])
        return MemoryReport(
            peak_bytes=self.peak_bytes,
            by_category=by_cat,
            baseline_bytes=self.baseline_bytes,
            method="cpu: live-tensor dispatch tracker (exact storage bytes)",
            category_max=cat_max,
            resolution_bytes=CPU_ALIGNMENT_BYTES * live_at_peak,
        )


def _has_storage(t: Any) -> bool:
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return False
    try:
        t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return False
    return True


def _category(rec: _Record, key: int | None, grads: set[int], state: set[int]) -> str:
    if rec.preexisting == "parameters":
        return "parameters"
    if key is not None and key in grads:
        return "gradients"
    if key is not None and key in state or rec.preexisting == "optimizer_state":
        return "optimizer_state"
    if rec.preexisting == "gradients":
        return "gradients"
    if rec.saved:
        return "activations"
    if rec.snapshot:
        return "snapshot"
    if rec.drawn:
        return "directions"
    return "temporaries"


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def measure_step_memory(
    step: Callable[[], object],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str = "cpu",
) -> MemoryReport:
    """Peak memory of one call of ``step()`` (e.g. estimate + optimizer step), by category."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_step_memory(step, model, optimizer, device)
    with LiveTensorTracker(model, optimizer) as tracker:
        step()
    return tracker.report()


def _cuda_step_memory(step, model, optimizer, device) -> MemoryReport:
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    params = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())) if model else 0
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None) if model else 0
    state = sum(t.numel() * t.element_size() for t in _optimizer_tensors(optimizer))
    by_cat = {"parameters": params, "gradients": grads, "optimizer_state": state,
              "other": max(peak - params - grads - state, 0)}
    return MemoryReport(peak_bytes=peak, by_category=by_cat, baseline_bytes=baseline,
                        method="cuda: torch.cuda.max_memory_allocated, peak reset before the step",
                        resolution_bytes=CUDA_RESOLUTION_BYTES,
                        notes="activations, directions and temporaries are not separated on CUDA")

