"""Write the JSON Schema of every versioned contract to ``schemas/json/`` (for non-Python producers).

    python -m schemas.export            # rewrite the files
    python -m schemas.export --check    # exit 1 if a file is stale (tests run this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.artifacts import Lineage, RegistryAction, SnapshotManifest, TrainedAdapter, Verdict
from schemas.events import DeadLetter, QAEvent, RetrainRequest, RetrainStatus
from schemas.serving import AnswerEvent

CONTRACTS: tuple[type[BaseModel], ...] = (
    QAEvent, RetrainRequest, RetrainStatus, DeadLetter,
    SnapshotManifest, Lineage, TrainedAdapter, Verdict, RegistryAction, AnswerEvent,
)
OUT = Path(__file__).resolve().parent / "json"


def rendered() -> dict[str, str]:
    """File name -> JSON Schema text, e.g. ``QAEvent.v1.json``."""
    files = {}
    for model in CONTRACTS:
        version = model.model_fields["schema_version"].default
        files[f"{model.__name__}.v{version}.json"] = json.dumps(model.model_json_schema(), indent=2) + "\n"
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args()
    stale = [
        name for name, text in rendered().items() if not (OUT / name).is_file() or (OUT / name).read_text() != text
    ]
    if args.check:
        if stale:
            sys.exit(f"stale JSON Schema files (run python -m schemas.export): {stale}")
        return
    OUT.mkdir(exist_ok=True)
    for name, text in rendered().items():
        (OUT / name).write_text(text)


if __name__ == "__main__":
    main()
