"""Registry side of the gate: register a judged candidate, move the ``challenger`` / ``champion`` aliases.

    medretrain registry review | promote <version> | reject <version> --reason ... | rollback | history

Promotion reads only the Verdict (and the run it names). Every candidate becomes a model version
tagged with its decision, so a version that failed can still be promoted, but only with
``--force --reason``. Only a version whose artifacts were just downloaded and checked ever gets
an alias. Each action is a :class:`RegistryAction` stored as a tag on its version, and the
registered model keeps the list of successive champions so ``rollback`` can step back.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from deploy.registry import BASE_VERSION_TAG, CHALLENGER, CHAMPION, RUN_VERSION_TAG, alias_version, open_registry
from schemas.artifacts import RegistryAction, Verdict
from schemas.settings import Settings

log = logging.getLogger(__name__)

HISTORY_TAG = "medretrain.champion_history"
"""Registered-model tag: JSON list of the versions that were champion, oldest first."""
HISTORY_KEEP = 200
"""Champion history entries kept (a registered-model tag value holds about 5,000 characters)."""
ACTION_TAG = "medretrain.action."
REASON_MAX_CHARS = 2000
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class RegistryError(RuntimeError):
    """A registry action that must not happen (missing version, failed gate without force, broken artifacts)."""


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # an outage is not a missing version: the caller may retry
        raise RegistryError(f"registered model {name!r} has no version {version!r}") from e


def record_action(client, name: str, action: RegistryAction) -> None:
    """Store the action as the next numbered ``medretrain.action.NNNN`` tag of its version."""
    tags = _version(client, name, action.version).tags
    number = sum(key.startswith(ACTION_TAG) for key in tags)
    if len(action.reason) > REASON_MAX_CHARS:  # a tag value holds about 5,000 characters
        action = action.model_copy(update={"reason": action.reason[: REASON_MAX_CHARS - 1] + "…"})
    client.set_model_version_tag(name, action.version, f"{ACTION_TAG}{number:04d}", action.model_dump_json())
    log.info("%s version %s: %s by %s %s", name, action.version, action.action, action.actor, action.reason)


def actions_of(version) -> list[RegistryAction]:
    """Recorded actions of one ModelVersion, oldest first."""
    keys = sorted(k for k in version.tags if k.startswith(ACTION_TAG))
    return [RegistryAction.model_validate_json(version.tags[k]) for k in keys]


def verify_artifacts(client, name: str, version: str) -> None:
    """Download the version's artifacts and check they are a loadable model; raise before any alias moves."""
    import mlflow

    mv = _version(client, name, version)
    kind = mv.tags.get("kind")
    try:
        if kind == "base":  # hundreds of MB: listing proves the store still holds the weights
            names = {Path(f.path).name for f in client.list_artifacts(mv.run_id, "model")}
        else:
            with tempfile.TemporaryDirectory(prefix="medretrain-verify-") as tmp:
                path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp)
                names = {p.name for p in Path(path).iterdir()}
    except Exception as e:
        raise RegistryError(f"{name} version {version}: artifacts are not downloadable ({e})") from e
    required = ("config.json",) if kind == "base" else ADAPTER_FILES
    missing = [f for f in required if f not in names]
    if not set(TOKENIZER_FILES) & names:
        missing.append(" or ".join(TOKENIZER_FILES))
    if kind == "base" and not any(n.endswith(".safetensors") for n in names):
        missing.append("*.safetensors")
    if missing:
        raise RegistryError(f"{name} version {version} ({kind}) lacks {missing}: no alias will point at it")


def champion_history(client, name: str) -> list[str]:
    return json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def _set_champion(client, name: str, version: str, history: list[str]) -> None:
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_KEEP:]))


def version_tags(verdict: Verdict, run_tags: dict[str, str]) -> dict[str, str]:
    """Tags of a candidate's model version: lineage, decision, and the candidate's metrics."""
    lineage = {k: v for k, v in run_tags.items() if k.startswith("lineage.")}
    failed = [r.name for r in verdict.rules if not r.passed]
    return {
        **lineage,
        "kind": "adapter",
        "base_version": run_tags.get(BASE_VERSION_TAG, ""),
        "parent_version": run_tags.get("lineage.parent_version", ""),
        "snapshot": run_tags.get("lineage.snapshot_id", ""),
        "request": run_tags.get("lineage.request_id", ""),
        "gate": "passed" if verdict.passed else "failed",
        "gate.failed_rules": ",".join(failed),
        "gate.baseline_version": verdict.baseline_version or "",
        "decision": f"runs:/{verdict.candidate_run_id}/decision.json",
        **{f"metric.{k}": f"{v:.6g}" for k, v in verdict.metrics.get("candidate", {}).items()},
    }


def _register(client, name: str, verdict: Verdict) -> str:
    """A model version for the candidate run (the existing one when the run was judged before)."""
    run_id = verdict.candidate_run_id
    tags = version_tags(verdict, client.get_run(run_id).data.tags)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = str(existing[0].version)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        return version
    source = f"runs:/{run_id}/adapter"
    return str(client.create_model_version(name, source=source, run_id=run_id, tags=tags).version)


def registered_version(settings: Settings, run_id: str) -> str | None:
    """The model version that :func:`apply_verdict` registered for a candidate run (for RetrainStatus)."""
    client, _ = open_registry(settings)
    return client.get_run(run_id).data.tags.get(RUN_VERSION_TAG)


def apply_verdict(settings: Settings, verdict: Verdict, actor: str = "evaluator") -> str:
    """Register the candidate; a pass gets ``challenger`` (and ``champion`` in auto mode). Returns the version."""
    client, name = open_registry(settings)
    version = _register(client, name, verdict)
    client.set_tag(verdict.candidate_run_id, RUN_VERSION_TAG, version)
    failed = "; ".join(f"{r.name}: {r.detail}" for r in verdict.rules if not r.passed)
    reason = "gate passed" if verdict.passed else f"gate failed: {failed}"
    record_action(client, name, RegistryAction(action="registered", version=version, actor=actor, reason=reason))
    if not verdict.passed:
        log.warning("%s version %s failed the gate; the champion stays: %s", name, version, failed)
        return version
    verify_artifacts(client, name, version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    record_action(client, name, RegistryAction(action="challenger", version=version, actor=actor, reason="gate passed"))
    if settings.evaluate.promotion == "auto":
        promote(settings, version, actor=actor, reason="evaluate.promotion=auto and the gate passed")
    else:
        log.info(
            "%s version %s is the challenger; waiting for `medretrain registry promote %s`", name, version, version
        )
    return version


def promote(settings: Settings, version: str, actor: str, reason: str = "", force: bool = False) -> RegistryAction:
    """Make ``version`` the champion; a version that failed the gate or was rejected needs ``force`` and a reason."""
    client, name = open_registry(settings)
    mv = _version(client, name, version)
    cleared = mv.tags.get("gate") == "passed" and mv.tags.get("rejected") != "true"
    if not cleared and not force:
        why = (
            "was rejected"
            if mv.tags.get("rejected") == "true"
            else f"did not pass the gate (gate={mv.tags.get('gate')})"
        )
        raise RegistryError(f"{name} version {version} {why}: promote it with --force --reason '...'")
    if force and not reason.strip():
        raise ValueError("--force needs --reason: say why the gate is overridden")
    current = alias_version(client, name, CHAMPION)
    if current == str(version):
        raise RegistryError(f"{name} version {version} is already the champion")
    baseline = mv.tags.get("gate.baseline_version")
    if cleared and baseline and current and baseline != current:
        log.warning("version %s was judged against version %s, but the champion is now %s", version, baseline, current)
    verify_artifacts(client, name, str(version))
    history = champion_history(client, name)
    if current and (not history or history[-1] != current):
        history.append(current)  # a champion set outside promote (the bootstrap base)
    _set_champion(client, name, str(version), [*history, str(version)])
    if alias_version(client, name, CHALLENGER) == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)
    action = RegistryAction(
        action="promoted" if cleared else "forced", version=str(version), actor=actor, reason=reason
    )
    record_action(client, name, action)
    return action


def reject(settings: Settings, version: str, actor: str, reason: str) -> RegistryAction:
    """Mark ``version`` rejected and drop its ``challenger`` alias; the champion cannot be rejected (roll back)."""
    if not reason.strip():
        raise ValueError("reject needs --reason")
    client, name = open_registry(settings)
    _version(client, name, version)
    if alias_version(client, name, CHAMPION) == str(version):
        raise RegistryError(f"{name} version {version} is the champion: `medretrain registry rollback` first")
    client.set_model_version_tag(name, str(version), "rejected", "true")
    if alias_version(client, name, CHALLENGER) == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)
    action = RegistryAction(action="rejected", version=str(version), actor=actor, reason=reason)
    record_action(client, name, action)
    return action


def rollback(settings: Settings, actor: str, reason: str = "") -> RegistryAction:
    """Give ``champion`` back to the version that held it before the current one."""
    client, name = open_registry(settings)
    current = alias_version(client, name, CHAMPION)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back")
    history = champion_history(client, name)
    if current in history:
        history = history[: len(history) - history[::-1].index(current) - 1]
    earlier = [v for v in history if v != current]
    if not earlier:
        raise RegistryError(f"{name} has no earlier champion than version {current}")
    target = earlier[-1]
    verify_artifacts(client, name, target)
    _set_champion(client, name, target, history[: len(history) - history[::-1].index(target)])
    why = f"champion {current} -> {target}" + (f": {reason}" if reason else "")
    record_action(
        client, name, RegistryAction(action="rollback", version=current, actor=actor, reason=f"demoted; {why}")
    )
    action = RegistryAction(action="rollback", version=target, actor=actor, reason=f"restored; {why}")
    record_action(client, name, action)
    return action


def history(settings: Settings) -> list[RegistryAction]:
    """Every recorded action on every version, oldest first."""
    client, name = open_registry(settings)
    versions = client.search_model_versions(f"name = '{name}'")
    return sorted((a for v in versions for a in actions_of(v)), key=lambda a: (a.at, int(a.version)))
