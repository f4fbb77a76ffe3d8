"""A run pins the image folder it was made from: its absolute location, its classes in label order, and the
digest of its file list (per class too), all in the run's manifest. Commands that open the folder again
(evaluate, resume, show, explore) compare what they find with what was pinned:

  classes renamed, added, removed or reordered   refused, one line: label k would mean another class
  files added, removed or changed                a warning with counts per class: the classes still mean
                                                 what they meant, but the test is no longer the same test
                                                 (a file is known by its path, size and modification time:
                                                 a copy that did not keep the times counts as changed)

No torch: this compares two `ImageFolder.describe()` records.
"""
from __future__ import annotations

from typing import Any

from cnnlab.errors import UserError

LISTED = 5  # classes named in a one-line message


class FolderChanged(UserError, ValueError):
    """The image folder's classes are not those the run was trained on."""


def class_change(then: list[str], now: list[str]) -> str | None:
    """How the class list changed in words ('renamed cat -> kitty', 'added bird', ...), or None when it did not."""
    if then == now:
        return None
    added = [name for name in now if name not in then]
    removed = [name for name in then if name not in now]
    parts = []
    if added and removed and len(added) == len(removed):
        parts.append("renamed " + ", ".join(f"{old} -> {new}" for old, new in zip(removed, added)))
    else:
        if added:
            parts.append("added " + ", ".join(added[:LISTED]) + (" ..." if len(added) > LISTED else ""))
        if removed:
            parts.append("removed " + ", ".join(removed[:LISTED]) + (" ..." if len(removed) > LISTED else ""))
    if not parts:
        parts.append("the same classes in another order")
    return "; ".join(parts)


def check_folder(recorded: dict[str, Any] | None, now: dict[str, Any], run: str) -> list[str]:
    """Compare an image folder as found now with the record in `run`'s manifest: FolderChanged when its classes
    differ, else warnings (one line each) when its files do. No record (a run from before pinning, or a named
    dataset): nothing to compare."""
    if not recorded or "classes" not in recorded:
        return []
    change = class_change(list(recorded["classes"]), list(now["classes"]))
    if change is not None:
        raise FolderChanged(f"{now['root']}: its class folders are not the ones {run} was trained on ({change}); "
                            "label numbers would name other classes. Restore the folder, or train a new run on it")
    if recorded.get("digest") in (None, now.get("digest")):
        return []
    return [files_changed(recorded, now, run)]


def files_changed(recorded: dict[str, Any], now: dict[str, Any], run: str) -> str:
    """One line: how many files each class gained or lost since `run` was trained (per-class totals over splits)."""
    then_counts, now_counts = class_totals(recorded), class_totals(now)
    deltas = [(name, now_counts.get(name, 0) - then_counts.get(name, 0)) for name in now["classes"]]
    moved = [f"{name} {delta:+d}" for name, delta in deltas if delta]
    edited = [name for name in now["classes"]
              if (recorded.get("class_digests") or {}).get(name) not in (None, (now.get("class_digests") or {})
                                                                         .get(name))]
    detail = []
    if moved:
        detail.append("files per class: " + ", ".join(moved[:LISTED]) + (" ..." if len(moved) > LISTED else ""))
    unchanged_count = [name for name in edited if dict(deltas).get(name) == 0]
    if unchanged_count:
        detail.append(f"files with another size or modification time in {', '.join(unchanged_count[:LISTED])}"
                      + (" ..." if len(unchanged_count) > LISTED else ""))
    what = "; ".join(detail) or "files with another size or modification time"
    total_then, total_now = sum(then_counts.values()), sum(now_counts.values())
    return (f"{now['root']} changed since {run} was trained ({total_then} -> {total_now} files; {what}): "
            "the splits are not the ones it was tested on")


def class_totals(record: dict[str, Any]) -> dict[str, int]:
    """Files per class over all splits, from a record's per_class counts."""
    totals: dict[str, int] = {}
    for per_class in (record.get("per_class") or {}).values():
        for name, count in per_class.items():
            totals[name] = totals.get(name, 0) + int(count)
    return totals
