import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from pipelines import store


def test_validate_names_missing_column():
    table = pa.table({"item_id": ["a"], "dataset": ["d"]})
    with pytest.raises(schemas.SchemaError, match="missing column 'split'"):
        schemas.validate(table.schema, schemas.MANIFEST)


def test_validate_names_mistyped_column():
    fields = [pa.field(f.name, f.type) for f in schemas.DESCRIPTIONS]
    fields[[f.name for f in fields].index("prompt_tokens")] = pa.field("prompt_tokens", pa.string())
    with pytest.raises(schemas.SchemaError, match="column 'prompt_tokens' has type string"):
        schemas.validate(pa.schema(fields), schemas.DESCRIPTIONS)


def test_read_folder_validates_each_file(tmp_path):
    good = pa.Table.from_pylist([{"caption_id": "c1", "item_id": "i1", "lang": "en", "text": "a dog",
                                  "origin": "human", "created_at": dt.datetime.now(dt.timezone.utc)}],
                                schema=schemas.CAPTIONS)
    store.write_atomic(good, tmp_path / "good.parquet")
    assert store.read_folder(tmp_path, schemas.CAPTIONS).column("text").to_pylist() == ["a dog"]
    pq.write_table(pa.table({"caption_id": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(schemas.SchemaError, match=r"bad.parquet: missing column 'item_id'"):
        store.read_folder(tmp_path, schemas.CAPTIONS)


def test_schema_version_travels_in_file_metadata(tmp_path):
    store.write_atomic(schemas.MANIFEST.empty_table(), tmp_path / "m.parquet")
    meta = pq.read_schema(tmp_path / "m.parquet").metadata
    assert meta[b"leccr.schema_version"] == schemas.SCHEMA_VERSION.encode()
    assert meta[b"leccr.schema"] == b"manifest"


def test_exclusive_lock_refuses_a_second_writer(tmp_path):
    with store.exclusive(tmp_path, "describe"):
        with pytest.raises(store.StageInputError, match="another `describe` run"):
            with store.exclusive(tmp_path, "describe"):
                pass
    with store.exclusive(tmp_path, "describe"):  # released: usable again
        pass
