"""Stages of an experiment that are reused on a re-run when their inputs are unchanged.

A stage writes a JSON record with a ``key`` (a fingerprint of everything its result depends on) and
``complete: true`` when it finished; a later run with the same key reuses it instead of recomputing.
"""

import hashlib
import json
from pathlib import Path
from typing import Optional


def fingerprint(obj) -> str:
    """A short, stable hash of a JSON-able description of a stage's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_stage(path: Path, key: str, force: bool = False) -> Optional[dict]:
    """The stage's record if it finished with this key (and ``force`` is off), else None."""
    if force or not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == key and record.get("complete") else None


def save_stage(path: Path, record: dict) -> dict:
    """Mark a stage finished (the record must carry its ``key``)."""
    record = {**record, "complete": True}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record
