"""The category space: LVIS category ids <-> contiguous indices 0..K-1, names and r/c/f frequency.

Every artifact (dump manifest, statistics file, results) carries the space's `hash` so that readers
can refuse a mismatch (for example statistics of LVIS v0.5 applied to an LVIS v1 model).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcb_analysis.errors import PcbkitError, input_error
from pcb_analysis.lvis_checks import int_column, unique_ids
from pcb_analysis.lvis_json import read_lvis_json

FREQUENCIES = ("r", "c", "f")


@dataclass(frozen=True)
class CategorySpace:
    """K foreground classes in contiguous order (sorted by LVIS category id).

    ids[k]: LVIS category id of contiguous class k; names[k]: its name; frequency[k]: 'r'|'c'|'f';
    image_count[k]: number of training images containing it (0 when unknown).
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]
    frequency: tuple[str, ...]
    image_count: tuple[int, ...]

    def __post_init__(self) -> None:
        k = len(self.ids)
        if not (len(self.names) == len(self.frequency) == len(self.image_count) == k):
            raise PcbkitError("category space: ids, names, frequency and image_count differ in length")
        if len(set(self.ids)) != k:
            raise PcbkitError("category space: duplicate category ids")
        bad = sorted({f for f in self.frequency if f not in FREQUENCIES})
        if bad:
            raise PcbkitError(f"category space: unknown frequency value(s) {bad}; expected r, c or f")

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    @property
    def hash(self) -> str:
        """Short stable hash of ids, names and frequencies (not counts, which differ between splits)."""
        payload = json.dumps([list(self.ids), list(self.names), list(self.frequency)], separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def index_of(self) -> dict[int, int]:
        """Map LVIS category id -> contiguous index."""
        return {cid: k for k, cid in enumerate(self.ids)}

    def bucket_indices(self, freq: str) -> list[int]:
        """Contiguous indices of the classes in frequency bucket `freq` ('r', 'c' or 'f')."""
        return [k for k, f in enumerate(self.frequency) if f == freq]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ids": list(self.ids),
            "names": list(self.names),
            "frequency": list(self.frequency),
            "image_count": list(self.image_count),
            "hash": self.hash,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> CategorySpace:
        try:
            space = cls(
                ids=tuple(int(x) for x in d["ids"]),
                names=tuple(str(x) for x in d["names"]),
                frequency=tuple(str(x) for x in d["frequency"]),
                image_count=tuple(int(x) for x in d.get("image_count", [0] * len(d["ids"]))),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise input_error(source, f"malformed category space ({err!r})") from err
        if "hash" in d and d["hash"] != space.hash:
            raise input_error(
                source, f"category space hash {d['hash']} does not match its content ({space.hash})"
            )
        return space

    @classmethod
    def from_categories(
        cls, categories: list[dict[str, Any]], source: str | Path | None = None
    ) -> CategorySpace:
        """Build from an LVIS `categories` list (any order; sorted by id here). Ids are checked by the
        field-check layer of LVIS JSON (`pcb_analysis.lvis_checks`): integers, no repeats."""
        if not isinstance(categories, list):
            raise input_error(source, "field 'categories' is not a list")
        ids = int_column(categories, "id", source or "<categories>", "categories")
        unique_ids(ids, source or "<categories>", "categories", "category")
        try:
            cats = [categories[int(i)] for i in np.argsort(ids, kind="stable")]
            return cls(
                ids=tuple(int(c["id"]) for c in cats),
                names=tuple(str(c["name"]) for c in cats),
                frequency=tuple(str(c.get("frequency", "f")) for c in cats),
                image_count=tuple(int(c.get("image_count", 0)) for c in cats),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise input_error(source, f"field 'categories': malformed entry ({err!r})") from err

    @classmethod
    def from_lvis_json(cls, path: str | Path) -> CategorySpace:
        """Read the `categories` of an LVIS annotation file (the only section it needs)."""
        data = read_lvis_json(path, "annotation", require=("categories",))
        return cls.from_categories(data["categories"], source=path)

    def check_same(self, other: CategorySpace, what: str) -> None:
        """Raise a clear error when `other` (described by `what`) is a different category space."""
        if self.hash != other.hash:
            raise PcbkitError(
                f"{what}: category space mismatch (hash {other.hash}, K={other.num_classes}; "
                f"expected hash {self.hash}, K={self.num_classes})"
            )
