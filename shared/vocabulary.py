"""Item ids to rows of the item table: a fixed list of ids, or stable hashing into buckets."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from attune.shared.errors import ConfigError, InvalidEventError
from attune.shared.events import validate_item_id


@dataclass(frozen=True)
class Vocabulary:
    """Maps item ids to indices in ``0..num_items-1``.

    With ``ids`` the mapping is exact and unknown ids are an error; without, ids are hashed
    (BLAKE2b, so every device and the coordinator agree) and collisions share a row.
    """

    num_items: int
    ids: tuple[str, ...] | None = None
    _lookup: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_items, bool) or not isinstance(self.num_items, int) or self.num_items < 1:
            raise ConfigError(f"a vocabulary needs num_items >= 1, got {self.num_items!r}")
        if self.ids is not None and len(self.ids) != self.num_items:
            raise ConfigError(f"vocabulary has {len(self.ids)} ids but num_items={self.num_items}")
        lookup = {item: i for i, item in enumerate(self.ids)} if self.ids is not None else {}
        if self.ids is not None and len(lookup) != len(self.ids):
            raise ConfigError("vocabulary ids must be unique")
        object.__setattr__(self, "_lookup", lookup)

    @classmethod
    def of(cls, ids: Sequence[str]) -> Vocabulary:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise ConfigError(f"vocabulary ids must be a sequence of item ids, got {type(ids).__name__}")
        return cls(num_items=len(ids), ids=tuple(ids))

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the mapping (its size and ids): which row each item id has."""
        hashed = hashlib.sha256(str(self.num_items).encode())
        for item in self.ids or ():
            hashed.update(b"\x00" + item.encode())
        return hashed.hexdigest()

    def index(self, item_id: str) -> int:
        validate_item_id(item_id)
        if self.ids is None:
            digest = hashlib.blake2b(item_id.encode(), digest_size=8).digest()
            return int.from_bytes(digest, "little") % self.num_items
        try:
            return self._lookup[item_id]
        except KeyError:
            raise InvalidEventError(f"item_id {item_id!r} is not in the model's vocabulary") from None

    def indices(self, item_ids: Sequence[str]) -> list[int]:
        return [self.index(item) for item in item_ids]

    def find(self, item_id: str) -> int | None:
        """The row of a stored item id, or ``None`` when a fixed vocabulary no longer lists it (the
        app shipped a new one): such an event is left out of training, as if deleted."""
        if self.ids is not None:
            return self._lookup.get(item_id)
        return self.index(item_id)
