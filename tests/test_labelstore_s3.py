"""Stores on object storage, for real: a moto S3 server on 127.0.0.1 (started and stopped
here), s3fs as zarr's fsspec backend. infer-teacher (one and two ranks, a killed run
resumed), inspect, select-topk, merge, dedup and train-student on s3:// stores give the
same bytes and results as on local disk; opening costs a bounded number of requests; an
unreachable endpoint or a missing bucket is one line, exit 2."""
from __future__ import annotations

import logging
import os
import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("moto")
pytest.importorskip("s3fs")

import labelstore  # noqa: E402
from cli import main as cli_main  # noqa: E402
from test_teacher_infer import (ONE_THREAD, _cli_args, _torchrun, assert_same_store,  # noqa: E402
                                infer)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on loopback; the environment points boto/s3fs at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = dict(CREDENTIALS, AWS_ENDPOINT_URL=f"http://{host}:{port}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield env
    server.stop()


@pytest.fixture
def bucket(s3_env):
    import boto3
    import s3fs

    name = f"ssld-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()  # a listing cached by another test is stale
    return f"s3://{name}"


def chunk_bytes(url_or_path) -> dict[str, bytes]:
    """Every chunk object of a store (metadata excluded: it holds creation times)."""
    import fsspec
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # other processes wrote since the last listing

    fs, root = fsspec.core.url_to_fs(str(url_or_path))
    root = root.rstrip("/")
    return {path[len(root) + 1:]: fs.cat_file(path) for path in fs.find(root)
            if "/c/" in path[len(root):]}


def options():
    return dict(chunk_rows=4, batch_size=4, views=2, decoder="pil", embeddings=True)


def test_every_command_on_s3_matches_local_disk(image_folder, make_checkpoint, bucket, tmp_path,
                                                capsys):
    checkpoint = make_checkpoint()
    local, remote = tmp_path / "t.zarr", f"{bucket}/t.zarr"
    infer(image_folder.data, local, checkpoint=str(checkpoint), **options())
    infer(image_folder.data, remote, checkpoint=str(checkpoint), **options())
    assert_same_store(remote, local)
    assert chunk_bytes(remote) == chunk_bytes(local)  # byte for byte, every label array

    assert cli_main(["inspect", remote]) == 0
    assert "Complete           : True" in capsys.readouterr().out

    for where in (str(tmp_path), bucket):
        src = f"{where}/t.zarr"
        assert cli_main(["select-topk", "--store", src, "--k", "2", "--out",
                         f"{where}/sel.zarr"]) == 0
        assert cli_main(["merge", src, f"{where}/sel.zarr", "--out", f"{where}/m.zarr"]) == 0
        assert cli_main(["dedup", "--query", src, "--pool", f"{where}/sel.zarr", "--verify",
                         "none", "--threshold", "0.5", "--threads", "1", "--out",
                         str(tmp_path / f"dups-{where.startswith('s3')}.tsv")]) == 0
    capsys.readouterr()
    for name in ("sel.zarr", "m.zarr"):
        assert chunk_bytes(f"{bucket}/{name}") == chunk_bytes(tmp_path / name), name
    dups = [open(tmp_path / f"dups-{flag}.tsv").read().splitlines()[2:] for flag in (False, True)]
    assert dups[0] == dups[1] and dups[0]

    runs = {}
    for where, store in (("local", str(local)), ("s3", remote)):
        out = tmp_path / f"run-{where}"
        assert cli_main(["train-student", "--student", "test_resnet", "--store", store,
                         "--out", str(out), "--epochs", "1", "--batch-size", "4",
                         "--num-workers", "0", "--device", "cpu", "--input-size", "32",
                         "--threads", "1"]) == 0
        runs[where] = torch.load(out / "last.pt", weights_only=True)["state_dict"]
    for name, value in runs["local"].items():
        torch.testing.assert_close(runs["s3"][name], value, rtol=0, atol=0, msg=name)


def test_output_files_on_s3_match_local_disk(bucket, tmp_path, capsys):
    """dedup --out, export --out and select-topk --list-out take s3:// URLs (before: a local
    file named after the mangled URL, or a refusal), with the same bytes as on local disk,
    the same refusals of what they may not replace, and a missing bucket refused up front."""
    import fsspec
    import h5py

    rng = np.random.default_rng(0)
    store = str(tmp_path / "s.zarr")
    n = 24
    with labelstore.create(store, keys=[f"k{i:02d}.png" for i in range(n)], num_classes=6,
                           topk=2, embedding_dim=8, chunk_rows=8) as writer:
        indices = np.stack([rng.permutation(6)[:2] for _ in range(n)])[:, None]
        writer.write(0, indices, np.tile([[[0.6, 0.3]]], (n, 1, 1)),
                     embeddings=rng.normal(size=(n, 8)))
    fs = fsspec.filesystem("s3")

    def read(url_or_path) -> bytes:
        return fs.cat_file(url_or_path) if str(url_or_path).startswith("s3://") else \
            open(url_or_path, "rb").read()

    for where in (str(tmp_path), bucket):
        assert cli_main(["select-topk", "--store", store, "--k", "2", "--out",
                         f"{where}/sel.zarr", "--list-out", f"{where}/sel.txt"]) == 0
        assert cli_main(["dedup", "--query", store, "--pool", store, "--verify", "none",
                         "--threshold", "0.3", "--threads", "1", "--out", f"{where}/d.tsv"]) == 0
        assert cli_main(["export", store, "--out", f"{where}/x.h5"]) == 0
    capsys.readouterr()
    for name in ("sel.txt", "d.tsv", "d.tsv.rules.json"):
        assert read(f"{bucket}/{name}") == read(tmp_path / name) and read(tmp_path / name), name
    fs.get_file(f"{bucket}/x.h5", str(tmp_path / "from_s3.h5"))
    with h5py.File(tmp_path / "x.h5") as a, h5py.File(tmp_path / "from_s3.h5") as b:
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)

    # what exists is replaced only as on disk: an export with --overwrite, a dedup output
    code = cli_main(["export", store, "--out", f"{bucket}/x.h5"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert cli_main(["export", store, "--out", f"{bucket}/x.h5", "--overwrite"]) == 0
    fs.pipe_file(f"{bucket[5:]}/notes.tsv", b"precious\n")
    assert cli_main(["dedup", "--query", store, "--pool", store, "--verify", "none",
                     "--out", f"{bucket}/notes.tsv"]) == 2
    assert "not an ssld dedup output" in capsys.readouterr().err
    assert fs.cat_file(f"{bucket}/notes.tsv") == b"precious\n"
    code = cli_main(["select-topk", "--store", store, "--k", "2", "--out",
                     str(tmp_path / "sel2.zarr"), "--list-out", "s3://no-such-bucket-x/l.txt"])
    err = capsys.readouterr().err
    assert code == 2 and "bucket no-such-bucket-x does not exist" in err, err
    assert not (tmp_path / "sel2.zarr").exists()


@pytest.mark.slow
def test_two_ranks_on_s3_and_a_killed_run_resumed(image_folder, make_checkpoint, bucket,
                                                  s3_env, tmp_path):
    import s3fs

    checkpoint = make_checkpoint()
    settings = dict(chunk_rows=2, batch_size=2, decoder="pil")
    remote = f"{bucket}/two.zarr"
    args = _cli_args(image_folder.data, remote, checkpoint, **settings)
    killed = _torchrun(2, args, CHAOS_KILL_RANK="1", **s3_env)
    assert killed.returncode != 0
    assert not labelstore.open(remote).is_complete
    rerun = _torchrun(2, args, **s3_env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert labelstore.open(remote).is_complete  # this process listed the store before
    s3fs.S3FileSystem.clear_instance_cache()   # for the test's own zarr reads below
    infer(image_folder.data, tmp_path / "one.zarr", checkpoint=str(checkpoint), **settings)
    assert_same_store(remote, tmp_path / "one.zarr")
    assert chunk_bytes(remote) == chunk_bytes(tmp_path / "one.zarr")


class Counter:
    """Counts S3 API calls made through s3fs (every request goes through _call_s3)."""

    def __init__(self, monkeypatch):
        import s3fs

        self.calls: list[str] = []
        original = s3fs.S3FileSystem._call_s3

        async def counted(fs, method, *args, **kwargs):
            self.calls.append(getattr(method, "__name__", str(method)))
            return await original(fs, method, *args, **kwargs)

        monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


def test_opening_and_loading_cost_a_bounded_number_of_requests(bucket, monkeypatch):
    """Opening costs a constant (metadata of the group and its 10 arrays, existence probes,
    one listing) plus two requests (HEAD + GET, as s3fs reads one small object) per chunk of
    ``done``; ``load()`` one GET per chunk and label array; reads from RAM none. Never a
    request per row."""
    from test_labelstore import make_store

    counter = Counter(monkeypatch)
    costs = {}
    for chunks in (8, 16):
        url = f"{bucket}/count{chunks}.zarr"
        make_store(url, n=8 * chunks, views=2, k=3, classes=10, chunk_rows=8)
        counter.take()
        store = labelstore.open(url)
        opened = len(counter.take())
        store.keys, store.labels
        columns = len(counter.take())
        store.load()
        loaded = len(counter.take())
        part = store.read(np.arange(0, 8 * chunks, 7))
        assert len(part) and counter.take() == []          # served from RAM
        costs[chunks] = (opened, columns, loaded)
    (open8, columns8, load8), (open16, columns16, load16) = costs[8], costs[16]
    assert open16 - open8 == 2 * 8        # the extra done flags, nothing else grows
    assert open8 - 2 * 8 <= 36            # the constant part (measured: 32)
    assert columns16 - columns8 <= 2 * 2 * 8
    assert load16 - load8 == len(labelstore._format.LABEL_ARRAYS) * 8
@pytest.mark.parametrize("where", ["missing-bucket", "unreachable"])
def test_unreachable_endpoint_or_missing_bucket_is_one_line(s3_env, monkeypatch, capsys, where):
    import s3fs

    url = "s3://no-such-bucket-here/x.zarr"
    if where == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        url = "s3://ssld/x.zarr"
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        status = cli_main(["inspect", url])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert url in err
    assert ("cannot reach" in err) if where == "unreachable" else ("no label store" in err)
