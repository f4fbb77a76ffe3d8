"""What a sweep is, beyond its name: the spec content that decides what a trial's value means.

A study is identified by its name, and `cnnlab sweep run` under a name that exists resumes it. Two
sweep files under one name (another model, dataset, `set:` or search space) would otherwise be one
study whose trials `sweep best` ranks together. So a study records its spec's identity when it is
made (`cnnlab.spec`, with a sha256 to compare at a glance), and a sweep file whose identity differs is
refused in one line naming what differs. The seed, early termination, the name and W&B's descriptive
keys are left out: they change which points are tried or how soon one is stopped, not what a value
measures.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from cnnlab.config import ConfigError, load_config
from cnnlab.runs import layout
from cnnlab.sweep.spec import SweepError, SweepSpec

SPEC_ATTR, DIGEST_ATTR = "cnnlab.spec", "cnnlab.spec_sha256"
LEGACY_ATTRS = ("method", "metric", "grid")  # what studies made before SPEC_ATTR recorded (cnnlab.<key>)


def spec_identity(spec: SweepSpec) -> dict[str, Any]:
    """The spec content that decides what a trial's value means, as plain JSON values."""
    parameters = {p.key: {k: v for k, v in (("values", p.values), ("min", p.low), ("max", p.high),
                                            ("distribution", p.distribution), ("q", p.q)) if v is not None}
                  for p in spec.parameters}
    identity = {"method": spec.method, "metric": spec.metric, "goal": spec.goal, "model": spec.model,
                "dataset": spec.dataset, "set": list(spec.fixed), "parameters": parameters}
    return json.loads(json.dumps(identity, sort_keys=True))  # as the study's storage gives it back


def spec_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def check_same_spec(study: optuna.Study, spec: SweepSpec, name: str, shown_storage: str) -> None:
    """Record the spec's identity on a new study; refuse a sweep file whose identity differs from a resumed one's."""
    mine = spec_identity(spec)
    recorded = study.user_attrs.get(SPEC_ATTR)
    if recorded is None:  # a new study, or one made before identities were recorded
        check_legacy(study, spec, name, shown_storage)
        study.set_user_attr(SPEC_ATTR, mine)
        study.set_user_attr(DIGEST_ATTR, spec_digest(mine))
        return
    if not isinstance(recorded, dict) or spec_digest(recorded) != spec_digest(mine):
        found = differences(recorded if isinstance(recorded, dict) else {}, mine)
        raise SweepError(f"sweep {name!r} in {shown_storage} was started from another sweep file ({found}): "
                         f"give another --name for a new sweep, or resume it with the sweep file it was started "
                         "from")


def check_legacy(study: optuna.Study, spec: SweepSpec, name: str, shown_storage: str) -> None:
    """A study from before SPEC_ATTR: what it did record (method, metric, grid) must still match."""
    mine = {"method": spec.method, "metric": spec.metric}
    if spec.method == "grid":
        mine["grid"] = json.dumps(spec.grid(), sort_keys=True)
    for key, value in mine.items():
        recorded = study.user_attrs.get(f"cnnlab.{key}")
        if recorded is not None and recorded != value:
            shown = "the grid's values" if key == "grid" else f"{key} {recorded}"
            raise SweepError(f"sweep {name!r} in {shown_storage} was started with {shown}; this sweep file has "
                             f"{'other values' if key == 'grid' else value}: resume it with the same sweep file, "
                             "or give another --name for a new sweep")


def differences(recorded: dict[str, Any], mine: dict[str, Any]) -> str:
    """What differs, briefly: `model seed, this file top; parameters.lr`."""
    found = []
    for key in sorted(set(recorded) | set(mine)):
        old, new = recorded.get(key), mine.get(key)
        if old == new:
            continue
        if key == "parameters" and isinstance(old, dict) and isinstance(new, dict):
            found += [f"parameters.{p}" for p in sorted(set(old) | set(new)) if old.get(p) != new.get(p)]
        elif key == "set" and isinstance(old, list) and isinstance(new, list):
            changed = ([f"-{set_text(item)}" for item in old if item not in new]
                       + [f"+{set_text(item)}" for item in new if item not in old])
            found.append(f"set {' '.join(changed) or 'in another order'}")
        else:
            found.append(f"{key} {old}, this file {new}")
    return "; ".join(found) or "its recorded spec is unreadable"


def set_text(item: Any) -> str:
    """A recorded `set:` item as the sweep file says it: `epochs=1` (a (key, value) pair, or older text)."""
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return f"{item[0]}={item[1]}"
    return str(item)


def check_found_run(study: optuna.Study, trial: FrozenTrial, run: Path) -> None:
    """A trial folder found by its name (not where the study recorded it) must hold this trial's config: a
    folder of that name from another sweep would hand `best` another model's settings.

    The trial's config is rebuilt from the study's recorded spec and the trial's parameters; a study made
    before specs were recorded cannot be checked.
    """
    identity = study.user_attrs.get(SPEC_ATTR)
    if not isinstance(identity, dict):
        return
    # `set:` as recorded: (key, value) pairs, or "key=value" text in studies recorded before values were kept typed
    fixed = [item if isinstance(item, str) else (str(item[0]), item[1]) for item in identity.get("set", [])]
    overrides = [*fixed, *trial.params.items()]
    try:
        wanted = load_config(identity.get("model"), None, overrides,
                             data={"dataset": identity["dataset"]} if identity.get("dataset") else {}).to_dict()
        found = load_config(None, layout.path(run, "config")).to_dict()
    except (ConfigError, KeyError, OSError):
        found, wanted = {}, {"unreadable": True}
    if wanted.get("train", {}).get("lr") == "auto":  # the finder's suggestion is what the run recorded
        wanted["train"]["lr"] = found.get("train", {}).get("lr")
    asked, recorded = wanted.get("data", {}).get("dataset"), found.get("data", {}).get("dataset")
    if isinstance(asked, str) and isinstance(recorded, str) and recorded.endswith(os.path.normpath(asked)):
        wanted["data"]["dataset"] = recorded  # a folder relative to the sweep file, recorded absolute by the trial
    if found != wanted:
        raise SweepError(f"sweep {study.study_name!r}: trial {trial.number}'s run is not at "
                         f"{trial.user_attrs.get('run')}, and {run} holds another configuration (from another "
                         "sweep of that name?); give the --runs-dir the sweep ran in")
