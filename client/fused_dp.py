"""DP-SGD's per-sample gradients, clip factors and clipped sum in one compiled graph (torch.compile).

Opacus's hooks compute per-sample gradients layer by layer in eager mode (2.4x a non-private epoch of the CNN on
CPU here, 27x for ResNet-18). Here client.per_sample computes them from one batched backward pass (or by vmap for
models outside its algebra), and the clip factors and the weighted sum follow in the same function, which
torch.compile turns into one kernel sequence. Opacus's DPOptimizer does everything else (noise, scaling, the
accountant's hook): the fused sum enters through its `clip_and_accumulate`, and rows Opacus holds itself still go
through Opacus's own clipping, so the optimizer's semantics, the accountant and the white-box canaries (which add
their rows through that same method) are unchanged.

Shapes. Poisson batches vary in size, and compiling each size would recompile every few steps. A batch is cut
into chunks of two fixed sizes (ChunkSizes), the last one padded with masked rows: the graphs never change shape,
every batch size takes this path, and which rows are sampled is untouched (the sampler draws them exactly as
before; chunking decides only how they are computed). Clipping is per sample, so the sum over chunks is the sum
over the batch. At patient level a chunk holds whole patients, whose per-image gradients are summed before
clipping; with augmentation multiplicity, whole units' copies, whose gradients are averaged before clipping.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from client.per_sample import Factored, NotLayerwise, PerSample, by_vmap, layerwise, materialised
from common.errors import CareFedError

LOG = logging.getLogger(__name__)

COMPILE_PAYS_STEPS = 250  # ~3 s of cached compilation / ~14 ms saved per CNN step of 64 on one CPU thread
PER_SAMPLE_BYTES = 1 << 30
OPACUS_CLIP_EPSILON = 1e-6  # Opacus's clip factor is C / (norm + 1e-6), capped at 1: the same here, exactly


class FusedPathError(CareFedError):
    """The fused path cannot run this model here (and it was asked for explicitly)."""


@dataclass(frozen=True)
class ChunkSizes:
    """The two batch shapes compiled: `large` rows (about the study's expected batch) and `small` ones for the rest
    of a batch, so at most small - 1 padding rows are computed (or a quarter of a large chunk, when that is cheaper
    than many small ones: a small chunk costs about 1.3x per row). The same at every site of a study, so the graphs
    compiled once serve every site and round in the process."""

    large: int
    small: int = 8

    @classmethod
    def for_study(cls, batch_size: int, num_parameters: int, *, largest_unit: int = 1) -> ChunkSizes:
        """`batch_size` the study's expected batch; at most PER_SAMPLE_BYTES of per-sample gradients in a chunk;
        at patient level a chunk holds whole patients, so at least the largest patient's images."""
        small = 8
        large = min(max(small, small * (batch_size // small)), max(small, PER_SAMPLE_BYTES // (4 * num_parameters)))
        return cls(max(large, largest_unit), small)

    def image_chunks(self, rows: int) -> list[tuple[int, int, int]]:
        """(start, stop, size) of each chunk of a batch of `rows` images."""
        full, rest = divmod(rows, self.large)
        chunks = [(i * self.large, (i + 1) * self.large, self.large) for i in range(full)]
        start = full * self.large
        smalls = math.ceil(rest / self.small)
        if rest and smalls * self.small > 0.75 * self.large:
            return chunks + [(start, rows, self.large)]
        return chunks + [(start + i * self.small, min(start + (i + 1) * self.small, rows), self.small)
                         for i in range(smalls)]


@dataclass
class _Pending:
    x: torch.Tensor
    y: torch.Tensor
    owner: torch.Tensor | None  # grouped rows: the unit (0..P-1, in batch order) of each row
    scale: float = 1.0  # each unit's gradient is `scale` x the sum of its rows' (augmentation: 1 / copies)


class FusedClipping:
    """A model's fused DP-SGD gradient: `stage` a batch, then the optimizer's step computes its clipped sum."""

    def __init__(self, model: nn.Module, image_shape: tuple[int, ...], sizes: ChunkSizes, *, patients: bool,
                 compiled: bool) -> None:
        self.model, self.image_shape, self.sizes, self.patients = model, image_shape, sizes, patients
        self._function, self.how = _fused_function(model, image_shape, patients, compiled)
        # views of the weights: the optimizer updates them in place, so these stay current
        self._params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        self._buffers = dict(model.named_buffers())
        self._pending: _Pending | None = None
        self.loss: float | None = None  # the last batch's mean per-example loss (local, never released)

    def stage(self, x: torch.Tensor, y: torch.Tensor, owner: torch.Tensor | None = None, scale: float = 1.0) -> None:
        """The batch the optimizer's next `clip_and_accumulate` adds, with empty per-sample rows for Opacus."""
        self._pending = _Pending(x, y, owner, scale)
        for p in self.model.parameters():
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

    def attach(self, optimizer: DPOptimizer) -> None:
        """Route the staged batch's clipped sum into `optimizer.clip_and_accumulate`, after Opacus's own rows."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        order = [names[id(p)] for p in optimizer.params]
        inner = optimizer.clip_and_accumulate

        def clip_and_accumulate() -> None:
            if self._pending is None:
                inner()  # rows Opacus holds itself: the white-box canaries' when the audit adds them
                return
            pending, self._pending = self._pending, None
            sums = self.clipped_sum(pending, optimizer.max_grad_norm)
            for p, name in zip(optimizer.params, order, strict=True):
                _check_processed_flag(p.grad_sample)  # Opacus's guard: no batch is summed twice
                p.summed_grad = sums[name] if p.summed_grad is None else p.summed_grad + sums[name]
                _mark_as_processed(p.grad_sample)

        optimizer.clip_and_accumulate = clip_and_accumulate  # type: ignore[method-assign]

    def clipped_sum(self, batch: _Pending, max_grad_norm: float) -> dict[str, torch.Tensor]:
        """Sum over chunks of the clipped per-sample (or per-unit) gradients; sets `loss`. A unit's gradient g is
        `batch.scale` x its rows' sum s, and clip_C(a s) = a clip_{C/a}(s): the sums are clipped at C / scale."""
        bound = torch.tensor(float(max_grad_norm) / batch.scale, device=batch.x.device)
        total: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), device=batch.x.device)
        for x, y, owner, units, rows in self._chunks(batch):
            sums, losses = self._function(self._params, self._buffers, x, y, owner, units, bound)
            loss_sum += (losses * rows).sum()
            for name, value in sums.items():
                total[name] = value if name not in total else total[name] + value
        self.loss = float(loss_sum) / len(batch.y)
        return total if batch.scale == 1.0 else {name: value * batch.scale for name, value in total.items()}

    def _chunks(self, batch: _Pending) -> Iterator[tuple[torch.Tensor, ...]]:
        """(x, y, owner, unit mask, row mask) per fixed-size chunk; padding rows are zero images with mask 0."""
        chunks = (self.sizes.image_chunks(len(batch.y)) if batch.owner is None
                  else _patient_chunks(batch.owner, self.sizes.large))
        for start, stop, size, *patients in chunks:
            used = stop - start
            x, y = batch.x[start:stop], batch.y[start:stop]
            if used < size:
                x = torch.cat([x, x.new_zeros((size - used, *x.shape[1:]))])
                y = torch.cat([y, y.new_zeros(size - used)])
            rows = torch.zeros(size, device=x.device)
            rows[:used] = 1.0
            if batch.owner is None:
                yield x, y, None, rows, rows
                continue
            # patients numbered from 0 within the chunk; padding rows go to the last slot, which then holds no
            # patient (a chunk with padding has fewer patients than rows)
            owner = torch.full((size,), size - 1, dtype=torch.long, device=x.device)
            owner[:used] = batch.owner[start:stop] - batch.owner[start]
            units = torch.zeros(size, device=x.device)
            units[:patients[0]] = 1.0
            yield x, y, owner, units, rows


def _patient_chunks(owner: torch.Tensor, chunk: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, chunk, patients) of each chunk: as many whole patients as `chunk` rows hold."""
    count = int(owner[-1]) + 1
    bounds = torch.searchsorted(owner.cpu(), torch.arange(count + 1)).tolist()
    chunks, start, first = [], 0, 0
    for patient in range(count):
        if bounds[patient + 1] - bounds[patient] > chunk:
            raise FusedPathError(f"a patient has more than {chunk} images, more than one chunk holds")
        if bounds[patient + 1] - start > chunk:
            chunks.append((start, bounds[patient], chunk, patient - first))
            start, first = bounds[patient], patient
    chunks.append((start, bounds[count], chunk, count - first))
    return chunks


_FUNCTIONS: dict[tuple, tuple[Callable, str]] = {}


def _fused_function(model: nn.Module, image_shape: tuple[int, ...], patients: bool,
                    compiled: bool) -> tuple[Callable, str]:
    """One function per architecture, image shape and device, shared by every site and round in this process: the
    sites' models differ only in weights, which are its inputs, so a graph compiled once per chunk size serves them
    all. Also how it computes per-sample gradients ("layerwise" or "vmap")."""
    key = (*_architecture(model), image_shape, patients, compiled)
    if key not in _FUNCTIONS:
        template = copy.deepcopy(model)  # its weights are never read: functional_call substitutes the inputs
        try:
            per_sample, how = layerwise(template, image_shape), "layerwise"
        except NotLayerwise as err:
            per_sample, how = by_vmap(template), f"vmap ({err})"
        function = _clipped_sum_function(per_sample, patients)
        _FUNCTIONS[key] = (torch.compile(function, dynamic=False) if compiled else function), how
    return _FUNCTIONS[key]


def _architecture(model: nn.Module) -> tuple:
    """What a compiled graph depends on besides the inputs' shapes: the classes of the model and every submodule
    (the CNN and the weight-standardised CNN have the same weights but not the same function), weight shapes and
    device."""
    return (tuple(type(m).__qualname__ for m in model.modules()),
            tuple((n, tuple(p.shape)) for n, p in model.named_parameters()), str(next(model.parameters()).device))


def _clipped_sum_function(per_sample: PerSample, patients: bool) -> Callable:
    def clipped_sum(params, buffers, x, y, owner, units, max_grad_norm):
        grads, losses = per_sample(params, buffers, x, y)
        if patients:  # each patient's images' gradients summed into one sample, as Opacus's patient path does
            grads = {k: materialised(g) for k, g in grads.items()}
            grads = {k: torch.zeros_like(g).index_add_(0, owner, g) for k, g in grads.items()}
        norms = sum(_squared_norms(g) for g in grads.values()).sqrt()
        factor = (max_grad_norm / (norms + OPACUS_CLIP_EPSILON)).clamp(max=1.0) * units
        return {k: _weighted_sum(g, factor) for k, g in grads.items()}, losses

    return clipped_sum


def _squared_norms(grads: torch.Tensor | Factored) -> torch.Tensor:
    return grads.squared_norms() if isinstance(grads, Factored) else grads.flatten(1).square().sum(1)


def _weighted_sum(grads: torch.Tensor | Factored, weights: torch.Tensor) -> torch.Tensor:
    return grads.weighted_sum(weights) if isinstance(grads, Factored) else torch.einsum("i,i...", weights, grads)


_CHOSEN: dict[tuple, str] = {}  # what each architecture got in this process, so the choice is probed and logged once


def choose_engine(model: nn.Module, engine: str, *, image_shape: tuple[int, ...], sizes: ChunkSizes,
                  patients: bool, steps: int = 0, fresh_process: bool = False) -> FusedClipping | None:
    """The fused path for `model` on images of `image_shape`, or None for Opacus's hooks. `engine` is "opacus",
    "fused" (compiled, or an error) or "auto": compiled fused where it pays and compiles, else Opacus's hooks.
    `fresh_process`: this process trains `steps` steps and exits (a deployed SuperNode starts a ClientApp process
    per message), so compiling pays only for long rounds. Probed and logged once per model and shape in a process."""
    if engine == "opacus" or (engine == "auto" and not _fused_pays(steps, fresh_process)):
        return None
    key = (*_architecture(model), image_shape, sizes, patients)
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _probe(model, engine, image_shape, sizes, patients)
        _CHOSEN[key] = chosen
        LOG.info("DP-SGD per-sample gradients for %s: %s", type(model).__name__, chosen)
    if chosen.startswith("opacus"):
        return None
    return FusedClipping(model, image_shape, sizes, patients=patients, compiled=True)


def _fused_pays(steps: int, fresh_process: bool) -> bool:
    """Compiling costs seconds per process (cached on disk: 1-2 s per chunk shape for the CNN; the first time on a
    machine about 12 s, a minute for ResNet-18): a process that trains once earns that back only in a long round.
    A long-lived one (a simulation's Ray worker trains many sites and rounds) always does."""
    return not fresh_process or steps >= COMPILE_PAYS_STEPS


def _probe(model: nn.Module, engine: str, image_shape: tuple[int, ...], sizes: ChunkSizes, patients: bool) -> str:
    """Compile and run the fused path once on a zero image; if that fails, Opacus's hooks (or an error if the fused
    path was asked for)."""
    try:
        fused = FusedClipping(model, image_shape, sizes, patients=patients, compiled=True)
        device = next(model.parameters()).device
        zero = torch.zeros(1, dtype=torch.long, device=device)
        fused.clipped_sum(_Pending(torch.zeros((1, *image_shape), device=device), zero, zero if patients else None),
                          1.0)
        return f"fused, compiled, {fused.how} (chunks of {sizes.large} and {sizes.small} rows)"
    except Exception as err:  # noqa: BLE001 -- a capability probe: any failure to compile means "not here"
        if engine == "fused":
            raise FusedPathError(f"the compiled fused path fails on {type(model).__name__}: "
                                 f"{type(err).__name__}: {err}") from err
        return f"opacus hooks (the fused path does not compile here: {type(err).__name__}: {err})"
