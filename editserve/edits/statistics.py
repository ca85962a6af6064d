"""MEMIT's and AlphaEdit's statistics for the service: from pristine weights, ready before use.

The second moments E[kkᵀ] of the edited layers' down_proj inputs describe the *base* model, and
are cached on disk as its (`methods.stats.StatsCache`). The keys at layer l depend on every
layer below it, so they are collected on a workbench of their own whose editable matrices (every
layer's down_proj: what the weight methods change) are pristine for the whole computation: the
ledger's pristine copy where an edit touched the matrix, else a copy of the live one taken
before any other edit can land. The copies are dropped when the computation ends.

`start` computes the default layers of MEMIT and AlphaEdit in a background thread at start-up,
logging progress and showing it in /health (`status`), so the first such edit does not pay the
minutes they take. An edit that needs them while they compute waits for them (`wait`), before
it takes the edit lock: other edits go on meanwhile, and no client needs to retry a 503.

AlphaEdit's eigendecompositions of the statistics are kept here too (`eigh`), so they belong to
this model and leave with the service.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from editserve.edits.ledger import WeightLedger
from editserve.edits.methods import METHODS
from editserve.threads import release_thread_team
from methods.architectures import resolve
from methods.base import EditContext
from methods.stats import StatsCache, StatsSource
from methods.workbench import make_workbench

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0


def default_layers(model_type: str, num_layers: int) -> list[int]:
    """The layers that the methods reading second moments (MEMIT, AlphaEdit) edit on this model
    family by default."""
    found: set[int] = set()
    for spec in METHODS.values():
        if spec.reads_second_moments:
            found |= set(spec.load_hparams(model_type, num_layers, None).layers or ())
    return sorted(found)


class Statistics:
    """Second moments per layer of one served model (loaded, or computed on pristine weights),
    and their eigendecompositions."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        ledger: WeightLedger,
        cache: StatsCache,
        source: StatsSource,
        device: torch.device,
        fingerprint: str,
    ) -> None:
        # Made from the model before any edit hooks a module (GRACE): module objects of its own.
        bench = make_workbench(model)
        arch = resolve(bench)
        self._context = EditContext(
            model=bench,
            tokenizer=tokenizer,
            arch=arch,
            chat_prompt=lambda q: [],
            device=device,
            model_fingerprint=fingerprint,
        )
        self._editable = [arch.down_proj_name(i) for i in range(arch.num_layers)]
        self._ledger, self.cache, self.source, self.device = ledger, cache, source, device
        self._moments: dict[int, torch.Tensor] = {}
        self._eigen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._compute_lock = threading.Lock()  # one computation at a time (they share the bench)
        self._state_lock = threading.Lock()
        self._background: Future | None = None
        self._state: dict[str, Any] = {"state": "idle"}

    # -- start-up ------------------------------------------------------------------------------

    def start(self, layers: Sequence[int]) -> Future:
        """Computes (or loads) `layers` in a background thread. Call before serving starts or
        under the edit lock: the pristine copies are taken here, before returning."""
        layers = sorted(set(layers))
        cached = self.cache.cached(self._context.model_fingerprint, self.source, layers)
        pinned = {} if cached else self._pin_pristine(layers)
        done: Future = Future()
        self._background = done

        def run() -> None:
            try:
                self._load_or_compute(layers, pinned)
                done.set_result(None)
            except BaseException as exc:  # noqa: BLE001 (reported; an edit then retries)
                log.exception("statistics of layers %s failed", layers)
                self._set_state({"state": "failed", "layers": layers, "error": repr(exc)})
                done.set_exception(exc)
            finally:
                release_thread_team()  # editserve.threads: no idle OpenMP team left behind

        threading.Thread(target=run, name="editserve-stats", daemon=True).start()
        return done

    async def wait(self) -> float:
        """Waits for the start-up computation (if one runs); the seconds waited."""
        background = self._background
        if background is None or background.done():
            return 0.0
        started = time.monotonic()
        log.info("an edit waits for the statistics: %s", self._describe())
        # A failure was logged by the thread; `get` computes them again.
        with suppress(Exception):
            await asyncio.wrap_future(background)
        return time.monotonic() - started

    # -- use -----------------------------------------------------------------------------------

    def get(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """The statistics of `layers`; those not yet loaded are computed now, on pristine
        weights (called by an edit, under the edit lock: no weight changes meanwhile)."""
        background = self._background
        if background is not None:
            background.exception()  # waits; a failure was logged, and is retried below
        with self._state_lock:
            missing = sorted({layer for layer in layers if layer not in self._moments})
        if missing:
            self._load_or_compute(missing, self._pin_pristine(missing))
        with self._state_lock:
            return {layer: self._moments[layer] for layer in layers}

    def eigh(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """torch.linalg.eigh (float64) of `layer`'s second moment, decomposed once."""
        with self._state_lock:
            found = self._eigen.get(layer)
        if found is None:
            found = torch.linalg.eigh(self.get([layer])[layer].double())
            with self._state_lock:
                found = self._eigen.setdefault(layer, found)
        return found

    def status(self) -> dict[str, Any]:
        """For /health: idle (nothing asked yet), computing (done/total tokens), ready, failed."""
        with self._state_lock:
            return dict(self._state)

    # -- computing -----------------------------------------------------------------------------

    def _pin_pristine(self, layers: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pristine copies of the editable matrices, taken now: the ledger's where an edit
        touched one, else a copy of the live weight (an edit may land while they compute).
        Text the model samples depends on every layer; a corpus's keys only on those up to the
        last one collected (the forward stops there)."""
        upto = len(self._editable) if self.source.corpus is None else max(layers) + 1
        pinned = {}
        for name in self._editable[:upto]:
            live = self._context.model.get_parameter(name)
            kept = self._ledger.pristine(name)
            pinned[name] = (
                kept.to(live.device, live.dtype) if kept is not None else live.detach().clone()
            )
        return pinned

    @contextmanager
    def _pristine_bench(self, pinned: dict[str, torch.Tensor]) -> Iterator[None]:
        """The bench's editable matrices are `pinned` meanwhile, then the live ones again."""
        bench = self._context.model
        live = {name: bench.get_parameter(name) for name in pinned}
        for name, weight in pinned.items():
            _set_parameter(bench, name, nn.Parameter(weight, requires_grad=False))
        try:
            yield
        finally:
            for name, param in live.items():
                _set_parameter(bench, name, param)

    def _load_or_compute(self, layers: list[int], pinned: dict[str, torch.Tensor]) -> None:
        with self._compute_lock:
            fingerprint = self._context.model_fingerprint
            if self.cache.cached(fingerprint, self.source, layers):
                found = self.cache.get(self._context, self.source, layers)
                folder = self.cache.path(fingerprint, self.source, layers[0]).parent
                self._store(found, f"loaded from {folder}")
                return
            pinned = pinned or self._pin_pristine(layers)  # the cached files went meanwhile
            total = self.source.n_tokens
            self._set_state({"state": "computing", "layers": layers, "done": 0, "total": total})
            log.info(
                "computing the statistics of layers %s from %s (MEMIT and AlphaEdit edits wait "
                "for them; progress in /health)",
                layers,
                self.source.tag,
            )
            started = last_log = time.monotonic()

            def progress(done: int, total: int) -> None:
                nonlocal last_log
                self._set_state(
                    {"state": "computing", "layers": layers, "done": done, "total": total}
                )
                if time.monotonic() - last_log >= LOG_EVERY_S or done == total:
                    last_log = time.monotonic()
                    log.info("statistics: %d of %d tokens", done, total)

            with self._pristine_bench(pinned):
                found = self.cache.get(self._context, self.source, layers, progress)
            self._store(found, f"computed in {time.monotonic() - started:.1f} s")

    def _store(self, found: dict[int, torch.Tensor], how: str) -> None:
        with self._state_lock:
            self._moments.update({k: v.to(self.device) for k, v in found.items()})
            layers = sorted(self._moments)
            self._state = {"state": "ready", "layers": layers}
        log.info("statistics of layers %s ready (%s)", sorted(found), how)

    def _set_state(self, state: dict[str, Any]) -> None:
        with self._state_lock:
            self._state = state

    def _describe(self) -> str:
        state = self.status()
        if state["state"] == "computing":
            return f"{state['done']} of {state['total']} tokens done"
        return state["state"]


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, param)
