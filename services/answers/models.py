"""The versions the answer service serves: one base model in memory, each served version's LoRA adapter on it.

    models = ServedModels(settings)
    models.load("3")                                # download, check, add adapter "v3" (the routes do not change)
    models.switch({"champion": "3"})                # requests routed from now on get version 3
    version = models.acquire("champion"); ...; models.generate([Job(question, version)]); models.release(version)

Champion and challenger on one base cost one base: each is a named PEFT adapter, picked per group of a
batch with ``set_adapter``; a base version is served with the adapters disabled. A new adapter joins the
model between two decode steps of a running batch, not after the batch (20-30 s on a CPU), so a swap is
routed within seconds of the alias move. Generation is the
evaluator's (``generate_answers``: chat template, greedy, ``evaluate.no_repeat_ngram_size`` and
``max_new_tokens``), so what is served is what the gate measured.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.progress import Progress

from schemas.settings import Settings

log = logging.getLogger(__name__)

_QUIET = Progress(disable=True)
"""Generation's progress display, off: a served batch is not a job anyone watches."""


class VersionLoadError(RuntimeError):
    """A version's weights cannot be served (download, adapter config or weights, base mismatch)."""


@dataclass(frozen=True)
class Job:
    question: str
    version: str


@dataclass(frozen=True)
class Generated:
    answer: str
    version: str
    tokens: int


@dataclass
class _Base:
    model: Any
    """A PreTrainedModel, wrapped in a PeftModel once the first adapter is loaded (a base version served
    before that runs without PEFT's layers, as fast as a bare ``generate``)."""
    tokenizer: Any
    adapters: set[str] = field(default_factory=set)


def adapter_name(version: str) -> str:
    return f"v{version}"


def check_adapter(adapter_dir) -> None:
    """Read an adapter's config and weights before the model is touched: a broken one fails here, cleanly."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    try:
        PeftConfig.from_pretrained(str(adapter_dir))
        load_file(str(adapter_dir / "adapter_model.safetensors"))
    except Exception as e:
        raise VersionLoadError(f"adapter {adapter_dir} cannot be read: {e}") from e


def _set_adapters_off(base: _Base, off: bool) -> None:
    """PEFT's layers off (or back on) for a base-version batch; a bare model has none to switch."""
    from peft import PeftModel

    if isinstance(base.model, PeftModel):
        if off:
            base.model.base_model.disable_adapter_layers()
        else:
            base.model.base_model.enable_adapter_layers()


@contextlib.contextmanager
def _adapters_off(base: _Base):
    """A base-version batch; the model may be wrapped in PEFT meanwhile, so the state is looked at on each side."""
    _set_adapters_off(base, True)
    try:
        yield
    finally:
        _set_adapters_off(base, False)


class ServedModels:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Generation and adapter changes take turns: PEFT adds and removes layers' LoRA weights in place.
        # A change that waits is let in at the next decode step (see _changing and _let_changes_in).
        self._model_lock = threading.Lock()
        self._turn = threading.Condition()
        self._changes_waiting = 0
        # Routes, loaded versions and pending counts: held briefly, never during generation.
        self._state = threading.Lock()
        self._bases: dict[str, _Base] = {}
        self._versions: dict[str, Any] = {}  # version -> trainer.registry.ResolvedModel
        self._routes: dict[str, str] = {}
        self._pending: Counter[str] = Counter()

    def routes(self) -> dict[str, str]:
        with self._state:
            return dict(self._routes)

    def loaded(self) -> list[str]:
        with self._state:
            return sorted(self._versions, key=int)

    def load(self, version: str) -> None:
        """Make ``version`` servable (a no-op when it is); VersionLoadError when it cannot be, serving unchanged."""
        from trainer.registry import resolve

        with self._state:
            if version in self._versions:
                return
        try:
            resolved = resolve(self.settings, version)  # the download runs while requests keep being served
        except Exception as e:
            raise VersionLoadError(f"version {version} cannot be downloaded: {e}") from e
        self.add(resolved)

    def add(self, resolved) -> None:
        """Make a downloaded version (a trainer.registry.ResolvedModel) servable; VersionLoadError if it cannot be."""
        if resolved.adapter_dir is not None:
            check_adapter(resolved.adapter_dir)
        with self._changing():
            base = self._base_for(resolved)
            if resolved.adapter_dir is not None:
                self._add_adapter(base, resolved)
        with self._state:
            self._versions[resolved.version] = resolved
        log.info("version %s loaded (base %s)", resolved.version, resolved.base_version)

    @contextlib.contextmanager
    def _changing(self):
        """The model, for a change: taken at a running batch's next decode step (the batch then goes on)."""
        with self._turn:
            self._changes_waiting += 1
        try:
            with self._model_lock:
                yield
        finally:
            with self._turn:
                self._changes_waiting -= 1
                self._turn.notify_all()

    def _let_changes_in(self, base: _Base, active: str | None) -> None:
        """Called by the generating thread (which holds the model) after each decode step."""
        with self._turn:
            if not self._changes_waiting:
                return
            self._model_lock.release()
            try:
                self._turn.wait_for(lambda: not self._changes_waiting)
            finally:
                self._model_lock.acquire()
        # As it was: a change (adding an adapter, or wrapping the bare model) never changes the batch's adapters.
        if active is not None:
            base.model.set_adapter(active)
        else:
            _set_adapters_off(base, True)

    def _base_for(self, resolved) -> _Base:
        from trainer.model import load_base

        base = self._bases.get(resolved.base_version)
        if base is None:
            if self._bases:
                log.warning("version %s sits on base %s, not on the loaded base %s: loading that base too (one more "
                            "base model in memory)", resolved.version, resolved.base_version, sorted(self._bases))
            model, tokenizer = load_base(resolved.base_dir)
            base = self._bases[resolved.base_version] = _Base(model.eval(), tokenizer)
        return base

    def _add_adapter(self, base: _Base, resolved) -> None:
        from peft import PeftModel

        from trainer.model import load_adapter

        name = adapter_name(resolved.version)
        try:
            base.model = load_adapter(base.model, resolved.adapter_dir, adapter_name=name).eval()
        except Exception as e:
            if isinstance(base.model, PeftModel) and name in base.model.peft_config and base.adapters:
                base.model.delete_adapter(name)  # no half-loaded adapter stays in the layers
            raise VersionLoadError(f"version {resolved.version}: adapter does not fit base "
                                   f"{resolved.base_version}: {e}") from e
        base.adapters.add(name)

    def switch(self, routes: dict[str, str]) -> None:
        """Route aliases to loaded versions; requests already routed keep theirs."""
        with self._state:
            missing = [v for v in routes.values() if v not in self._versions]
            if missing:
                raise VersionLoadError(f"versions {missing} are not loaded")
            self._routes = dict(routes)

    def acquire(self, alias: str) -> str | None:
        """The version ``alias`` routes to now, held until :meth:`release` (so it is never unloaded meanwhile)."""
        with self._state:
            version = self._routes.get(alias)
            if version is not None:
                self._pending[version] += 1
            return version

    def release(self, version: str) -> None:
        with self._state:
            self._pending[version] -= 1

    def unload_unused(self) -> None:
        """Drop versions no alias routes to and no request holds (a base's last adapter stays: PEFT needs one)."""
        with self._changing(), self._state:
            for version in [v for v in self._versions if v not in self._routes.values() and not self._pending[v]]:
                resolved = self._versions.pop(version)
                base = self._bases[resolved.base_version]
                name = adapter_name(version)
                if name in base.adapters and len(base.adapters) > 1:
                    base.model.delete_adapter(name)
                    base.adapters.discard(name)
                if not any(r.base_version == resolved.base_version for r in self._versions.values()):
                    del self._bases[resolved.base_version]
                log.info("version %s unloaded", version)

    def generate(self, jobs: Sequence[Job]) -> list[Generated]:
        """Answers in job order; the jobs of each version are generated together as one batch."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.version].append(i)
        out: list[Generated | None] = [None] * len(jobs)
        with self._model_lock:
            for version, indices in groups.items():
                answers, tokens = self._generate_version(version, [jobs[i].question for i in indices])
                for i, answer, count in zip(indices, answers, tokens, strict=True):
                    out[i] = Generated(answer=answer, version=version, tokens=count)
        return out  # type: ignore[return-value]

    def _generate_version(self, version: str, questions: list[str]) -> tuple[list[str], list[int]]:
        from evaluator.inference import generate_answers

        resolved = self._versions[version]
        base = self._bases[resolved.base_version]
        active = None if resolved.adapter_dir is None else adapter_name(version)
        if active is not None:
            base.model.set_adapter(active)
        evaluate = self.settings.evaluate
        with _adapters_off(base) if active is None else contextlib.nullcontext():
            answers = generate_answers(base.model, base.tokenizer, questions, evaluate.max_new_tokens,
                                       batch_size=len(questions), label=f"v{version}",
                                       no_repeat_ngram_size=evaluate.no_repeat_ngram_size, progress=_QUIET,
                                       after_step=lambda: self._let_changes_in(base, active))
        tokens = [len(ids) for ids in base.tokenizer(answers, add_special_tokens=False)["input_ids"]]
        return answers, tokens
