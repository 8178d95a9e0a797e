"""Tokenized MedQuAD rows kept between retrains, so workers encode only a round's new rows.

    encode = item_encoder(settings, write=True)     # encode(tokenizer, rows, max_length) -> [(row id, Example)]
    RankData(train_rows, val_rows, tokenizer, settings.train, encode=encode)

Every retrain's replay and validation rows come from the shipped MedQuAD file, so their encodings
recur from round to round; a snapshot's production rows (they carry an ``event_id``) are new and are
encoded afresh. Encodings, not packed rows, are cached: packing mixes each round's new rows in, and
it is cheap. Rows are looked up one by one, so the items equal :func:`trainer.data.encode_rows`'s
exactly. One entry per (tokenizer, ``max_length``, encoding code): changing any of them is a miss.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Sequence

from deploy.cache import BlobCache, cache_key
from schemas.data import QAPair
from schemas.settings import Settings
from trainer import data
from trainer.packing import IGNORE, Example

log = logging.getLogger(__name__)

KIND = "items"
ENCODING_CODE = (data.build_messages, data.render_pair, data._truncated, data.encode_rows)
"""What an encoding depends on besides the tokenizer and max_length: their source is part of the key."""

Encode = Callable[..., list[tuple[int, Example]]]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what tokenizing depends on: vocabulary and rules, chat template, special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
        tokenizer.chat_template or "",
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
    ]
    return hashlib.sha256("\x1e".join(parts).encode()).hexdigest()


def encoding_key(tokenizer, max_length: int) -> str:
    code = hashlib.sha256("".join(inspect.getsource(f) for f in ENCODING_CODE).encode() + data.SYSTEM_PROMPT.encode())
    return cache_key(tokenizer=tokenizer_fingerprint(tokenizer), max_length=max_length, code=code.hexdigest())


def row_digest(row: QAPair) -> str:
    return hashlib.sha256(f"{row.question}\x1f{row.answer}".encode()).hexdigest()[:24]


def _read(cache: BlobCache, key: str) -> dict[str, list[int]]:
    """digest -> [prompt length, *input ids]; empty on a miss or an entry that does not decode."""
    body = cache.get(key)
    if body is None:
        return {}
    try:
        entry = json.loads(gzip.decompress(body))
        if entry["key"] != key:
            raise ValueError(f"entry holds key {entry['key']}")
        return entry["rows"]
    except (OSError, ValueError, KeyError) as e:  # gzip, JSON and shape errors: rebuild, never use it
        log.warning("cached items %s unusable (%s): encoding afresh", key, e)
        return {}


def _example(packed: list[int]) -> Example:
    prompt, ids = packed[0], packed[1:]
    return Example(list(ids), [IGNORE] * prompt + ids[prompt:])


def _packed(example: Example) -> list[int]:
    prompt = next((i for i, label in enumerate(example.labels) if label != IGNORE), len(example.labels))
    return [prompt, *example.input_ids]


class CachedEncoder:
    """:func:`trainer.data.encode_rows` through the cache, read once per process; ``write`` adds the MedQuAD
    rows it had to encode."""

    def __init__(self, cache: BlobCache, write: bool):
        self.cache, self.write = cache, write
        self.known: dict[str, dict[str, list[int]]] = {}
        self.stats = {"cached": 0, "encoded": 0}

    def __call__(self, tokenizer, rows: Sequence[QAPair], max_length: int) -> list[tuple[int, Example]]:
        key = encoding_key(tokenizer, max_length)
        if key not in self.known:
            self.known[key] = _read(self.cache, key)
        known = self.known[key]
        digests = [row_digest(row) for row in rows]
        missing = [i for i, d in enumerate(digests) if d not in known]
        encoded = data.encode_rows(tokenizer, [rows[i] for i in missing], max_length)
        fresh = dict(zip(missing, (e for _, e in encoded), strict=True))
        self.stats["cached"] += len(rows) - len(missing)
        self.stats["encoded"] += len(missing)
        log.info("items: %d of %d rows from the cache, %d encoded", len(rows) - len(missing), len(rows), len(missing))
        added = {digests[i]: _packed(fresh[i]) for i in missing if rows[i].event_id is None}
        if added:
            known.update(added)
            if self.write:
                self.cache.put(key, gzip.compress(json.dumps({"key": key, "rows": known}).encode(), compresslevel=3))
        return [(i, fresh[i] if i in fresh else _example(known[d])) for i, d in enumerate(digests)]


def item_encoder(settings: Settings, write: bool) -> Encode:
    """``encode_rows`` through the S3 cache (``write``: this process adds what it encoded); plain with caches off."""
    cache = BlobCache.open(settings, KIND)
    return data.encode_rows if cache is None else CachedEncoder(cache, write)
