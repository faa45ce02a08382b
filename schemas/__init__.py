"""The Parquet contracts between stages: the one place that names a column.

Every writer writes with one of these explicit schemas; every reader calls `validate`, which
fails with a message naming the missing or mistyped column. The schema version travels in the
file's key-value metadata so that a future reader can tell old files from new ones.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"
_VERSION_KEY = b"leccr.schema_version"
_NAME_KEY = b"leccr.schema"


class SchemaError(ValueError):
    """A Parquet file or table does not match the contract it claims to follow."""


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={_NAME_KEY: name.encode(), _VERSION_KEY: SCHEMA_VERSION.encode()})


# Provenance of every generated row (design.md): who produced it, with which prompt and
# sampling, and a fingerprint over all of it so that a change never reuses old output.
PROVENANCE_FIELDS = [
    pa.field("engine", pa.string()),          # backend: vllm | openai | transformers | ...
    pa.field("model", pa.string()),           # model id or path as given by the user
    pa.field("model_revision", pa.string()),  # hub revision or a content hash of a local folder
    pa.field("prompt", pa.string()),          # the exact prompt/template text
    pa.field("sampling", pa.string()),        # sampling parameters as canonical JSON
    pa.field("fingerprint", pa.string()),     # hash over all of the above (+ preprocessing)
    pa.field("prompt_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("latency_s", pa.float64()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
    pa.field("error_kind", pa.string()),      # short category, null when fine
    pa.field("error", pa.string()),           # readable reason, null when fine
    # 1 for a key's first row, n for its n-th (a rerun retrying a failed row); null in files
    # written before retries existed (= 1). The latest attempt of a key is the row that counts.
    pa.field("attempt", pa.int32()),
]

# One row per media item (image or video). `item_id` is stable: derived from the dataset's own
# id or the path relative to the input root, never from run order.
MANIFEST = _schema("manifest", [
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("split", pa.string()),
    pa.field("media_type", pa.string()),      # image | video | null when unknown
    pa.field("root", pa.string(), nullable=False),     # absolute input root
    pa.field("relpath", pa.string()),         # path relative to root (null if not decodable)
    pa.field("source_id", pa.string()),       # the dataset's own id (e.g. COCO image id)
    pa.field("size_bytes", pa.int64()),
    pa.field("error_kind", pa.string()),      # ingest-time problem: the item still gets a row
    pa.field("error", pa.string()),
])

# One row per caption: human captions from ingest, machine translations from translate.
CAPTIONS = _schema("captions", [
    pa.field("caption_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("split", pa.string()),
    pa.field("lang", pa.string(), nullable=False),     # BCP-47 code, e.g. en, de, zh-Hans
    pa.field("text", pa.string()),
    pa.field("origin", pa.string(), nullable=False),   # human | mt
    pa.field("source_caption_id", pa.string()),        # for mt: the caption it translates
    pa.field("source_lang", pa.string()),              # for mt: the language translated from
    # for mt: quality signals the trainer can filter or weight by
    pa.field("quality_flags", pa.list_(pa.string())),  # e.g. empty, copy_of_source, length_ratio, wrong_script
    pa.field("length_ratio", pa.float64()),            # len(translation) / len(source), in characters
    pa.field("backtranslation", pa.string()),          # optional round trip back to the source language
    pa.field("roundtrip_chrf", pa.float64()),          # chrF of the back-translation against the source
    *PROVENANCE_FIELDS,
])

# One row per (item, view): a detailed MLLM description of the item.
DESCRIPTIONS = _schema("descriptions", [
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("view", pa.string(), nullable=False),     # named prompt, e.g. objects, detailed
    pa.field("media_type", pa.string()),
    pa.field("text", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("n_frames", pa.int32()),                  # video frames given to the model
    pa.field("width", pa.int32()),                     # preprocessed size given to the model
    pa.field("height", pa.int32()),
    *PROVENANCE_FIELDS,
])

ALL = {"manifest": MANIFEST, "captions": CAPTIONS, "descriptions": DESCRIPTIONS}

# The columns that name one row of each output. A key may have several rows (attempts): readers
# see the latest only (store.read_folder, through store.latest_attempts).
KEYS = {"captions": ("caption_id",), "descriptions": ("item_id", "view", "fingerprint")}

# Columns added after version 1 without a version bump (a bump would change every fingerprint):
# a file without them is still valid, and readers see nulls.
ADDED_LATER = frozenset({"attempt"})


def name_of(schema: pa.Schema) -> str:
    return (schema.metadata or {}).get(_NAME_KEY, b"?").decode()


def validate(schema_like: pa.Schema, expected: pa.Schema, where: str = "table") -> None:
    """Raise SchemaError naming the first missing or mistyped column.

    Extra columns are allowed (a user's Parquet may carry more); order does not matter.
    """
    name = name_of(expected)
    for field in expected:
        idx = schema_like.get_field_index(field.name)
        if idx < 0 and field.name in ADDED_LATER:
            continue
        if idx < 0:
            raise SchemaError(f"{where}: missing column {field.name!r} required by the {name} schema "
                              f"v{SCHEMA_VERSION} (has: {', '.join(schema_like.names)})")
        actual = schema_like.field(idx).type
        if not _compatible(actual, field.type):
            raise SchemaError(f"{where}: column {field.name!r} has type {actual}, "
                              f"the {name} schema v{SCHEMA_VERSION} needs {field.type}")


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual.equals(expected):
        return True
    # large_string/string and int widths written by other tools carry the same data.
    if pa.types.is_string(expected) and (pa.types.is_large_string(actual) or pa.types.is_null(actual)):
        return True
    if pa.types.is_integer(expected) and (pa.types.is_integer(actual) or pa.types.is_null(actual)):
        return True
    if pa.types.is_floating(expected) and (pa.types.is_floating(actual) or pa.types.is_null(actual)):
        return True
    if pa.types.is_timestamp(expected) and pa.types.is_timestamp(actual):
        return True
    if pa.types.is_list(expected) and (pa.types.is_list(actual) or pa.types.is_large_list(actual)):
        return _compatible(actual.value_type, expected.value_type)
    return False


def conform(table: pa.Table, expected: pa.Schema, where: str = "table") -> pa.Table:
    """Validate, then return the table with exactly the expected columns, order and types."""
    validate(table.schema, expected, where)
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in expected]
    return pa.Table.from_arrays(columns, schema=expected)


def empty(expected: pa.Schema) -> pa.Table:
    return expected.empty_table()
