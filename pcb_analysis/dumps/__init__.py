"""Logit dumps: per-proposal rows written by `pcbkit dump-logits`, streamed by `pcbkit stats`.

R proposals, K foreground classes; logits [R, K+1] float16, background = column K; labels [R]:
-1 ignore, 0..K-1 positive (IoU >= 0.5), K background. One raw `.npy` file per column per
shard, shards listed in a manifest, each completed atomically and checked by CRC-32.
Modules: `format` (names, column specs, .npy header), `writer` (DumpWriter), `manifest`
(rank manifests, merge, provenance checks), `reader` (DumpReader, Chunk, ShardInfo).
Why this layout, and the completion protocol: docs/dumps.md. Statistics over a dump:
`pcb_analysis.stats.ClassStats.from_dump`.
"""

from pcb_analysis.dumps.format import (
    COMPLETE_NAME,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_SHARD_ROWS,
    FORMAT_NAME,
    IMAGES_SPEC,
    MANIFEST_NAME,
    MUST_MATCH_PROVENANCE,
    NPY_HEADER_BYTES,
    PARTIAL_SUFFIX,
    REGRESSED_KINDS,
    SCHEMA_VERSION,
    ColumnSpec,
    column_specs,
    rank_manifest_name,
    shard_name,
)
from pcb_analysis.dumps.manifest import merge_manifests
from pcb_analysis.dumps.reader import Chunk, DumpReader, ShardInfo
from pcb_analysis.dumps.writer import DumpWriter

__all__ = [
    "COMPLETE_NAME",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_SHARD_ROWS",
    "FORMAT_NAME",
    "IMAGES_SPEC",
    "MANIFEST_NAME",
    "MUST_MATCH_PROVENANCE",
    "NPY_HEADER_BYTES",
    "PARTIAL_SUFFIX",
    "REGRESSED_KINDS",
    "SCHEMA_VERSION",
    "Chunk",
    "ColumnSpec",
    "DumpReader",
    "DumpWriter",
    "ShardInfo",
    "column_specs",
    "merge_manifests",
    "rank_manifest_name",
    "shard_name",
]
