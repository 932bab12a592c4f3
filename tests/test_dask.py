"""Running at scale: nnpartials.dask on a local Dask cluster of worker processes, and Parquet in and out of
`nnpartials partials` (in-process streaming, --workers, --scheduler).

References are the in-process Partials results computed here, chunk by chunk: the workers run the same code on the
same chunks, so the results must be equal bit for bit."""

import hashlib
import logging
import os
import sys

import numpy as np
import pytest

import dask
import dask.array as da
import dask.dataframe as dd
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client, LocalCluster

import nnpartials
import nnpartials.dask as nd
import nnpartials.io
from nnpartials.cli import main
from nnpartials.errors import InputError, InputTypeError, NNPartialsError

COLS = ["x1", "x2"]
TABLE = ["x1", "x2", "y", "dy/dx1", "dy/dx2"]


@pytest.fixture(scope="module")
def client():
    """Two worker processes, one thread each (as the CLI's --workers starts them)."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    with dask.config.set({"distributed.scheduler.allowed-failures": 3}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as c:
            yield c
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _points(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 20, size=(n, 2))


def _by_chunks(p, x, rows):
    """The in-process reference: Partials.jacobian on each chunk of ``rows`` points."""
    out, s = [], 0
    for r in rows:
        out.append(p.jacobian(x[s:s + r]))
        s += r
    return np.concatenate([a for a, _ in out]), np.concatenate([b for _, b in out])


def _no_leftovers(folder):
    return [p for p in os.listdir(folder) if ".partial-" in p or ".old-" in p] == []


# ---- the Python API ---------------------------------------------------------------------------------------------

def test_chunk_above_the_default_call_size_is_split_as_partials_splits_it(client, seed_bundle):
    p = nnpartials.Partials(seed_bundle)  # max_batch None: calls of p.batch_limit() points
    lim = p.batch_limit("jacobian")
    x = _points(2 * lim + 11, seed=4)
    xd = da.from_array(x, chunks=(len(x), 2))  # one chunk, larger than one call
    y, dy = client.compute(list(nd.partials(seed_bundle, xd)), sync=True)
    ry, rdy = p.jacobian(x)
    np.testing.assert_array_equal(dy, rdy)
    np.testing.assert_array_equal(y, ry)


@pytest.mark.parametrize("backend, max_batch", [("onnxruntime", None), ("onnxruntime", 50), ("c", None)])
def test_array_chunks_equal_in_process_partials(client, seed_bundle, backend, max_batch):
    x = _points(1000)
    xd = da.from_array(x, chunks=(137, 1))  # split columns are rechunked into one
    y, dy = nd.partials(seed_bundle, xd, backend=backend, max_batch=max_batch)
    assert y.shape == (1000, 1) and dy.shape == (1000, 1, 2) and y.dtype == dy.dtype == np.float32
    assert y.chunks[0] == dy.chunks[0] == xd.chunks[0]
    y, dy = client.compute([y, dy], sync=True)
    p = nnpartials.Partials(seed_bundle, backend=backend, max_batch=max_batch)
    ry, rdy = _by_chunks(p, x, xd.chunks[0])
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(dy, rdy)
    wy, wdy = p.jacobian(x)  # one in-process call on the whole table: the same values up to float32 rounding
    np.testing.assert_allclose(dy, wdy, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(y, wy, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", ["onnxruntime", "c"])
def test_dataframe_columns_by_name_equal_in_process_partials(client, seed_bundle, backend):
    x = _points(600, seed=1)
    pdf = pd.DataFrame({"x2": x[:, 1], "id": np.arange(600), "x1": x[:, 0]}, index=np.arange(600) + 10)
    ddf = dd.from_pandas(pdf, npartitions=4)
    table = nd.partials(seed_bundle, ddf, backend=backend)
    assert list(table.columns) == TABLE
    assert list(table.dtypes) == [np.float64, np.float64] + [np.float32] * 3
    got = client.compute(table, sync=True)
    assert list(got.columns) == TABLE and got.index.equals(pdf.index)
    p = nnpartials.Partials(seed_bundle, backend=backend)
    rows = [len(ddf.get_partition(k).compute()) for k in range(ddf.npartitions)]
    ry, rdy = _by_chunks(p, x, rows)
    np.testing.assert_array_equal(got[["x1", "x2"]].to_numpy(), x)
    np.testing.assert_array_equal(got["y"].to_numpy(), ry[:, 0])
    np.testing.assert_array_equal(got[["dy/dx1", "dy/dx2"]].to_numpy(), rdy[:, 0, :])


def test_several_inputs_and_outputs_and_empty_chunks(client, multi_bundle):
    p = nnpartials.Partials(multi_bundle)
    x = np.random.default_rng(8).normal(size=(90, p.n_in))
    xd = da.from_array(x, chunks=(30, 5))
    y, dy = client.compute(list(nd.partials(multi_bundle, xd)), sync=True)
    ry, rdy = _by_chunks(p, x, [30] * 3)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(dy, rdy)
    cols = p.input_columns[::-1]
    pdf = pd.DataFrame(x[:, ::-1], columns=cols)
    table = client.compute(nd.partials(multi_bundle, dd.from_pandas(pdf, npartitions=3)), sync=True)
    partial_names = nnpartials.io.partial_column_names(p.input_columns, p.output_columns)
    assert list(table.columns) == p.input_columns + p.output_columns + partial_names
    np.testing.assert_array_equal(table[p.output_columns].to_numpy(), ry)
    np.testing.assert_array_equal(table[partial_names].to_numpy(), rdy.reshape(90, -1))
    empty = dd.from_pandas(pd.DataFrame(np.zeros((0, p.n_in)), columns=p.input_columns), npartitions=1)
    assert client.compute(nd.partials(multi_bundle, empty), sync=True).shape == (0, len(table.columns))
    y, dy = client.compute(list(nd.partials(multi_bundle, da.zeros((0, p.n_in), chunks=(10, -1)))), sync=True)
    assert y.shape == (0, p.n_out) and dy.shape == (0, p.n_out, p.n_in)


def test_graph_carries_the_key_not_the_model(seed_bundle):
    import cloudpickle

    from nnpartials.bundle import Bundle
    from nnpartials.runtime.serve import Partials

    class Guard(cloudpickle.CloudPickler):
        def reducer_override(self, obj):
            assert not isinstance(obj, (Bundle, Partials)), "a loaded bundle is in the task graph"
            return super().reducer_override(obj)

    import io

    y, dy = nd.partials(seed_bundle, da.zeros((100, 2), chunks=(10, 2)))
    table = nd.partials(seed_bundle, dd.from_pandas(pd.DataFrame(np.zeros((10, 2)), columns=COLS), npartitions=2))
    for collection in (y, dy, table):
        Guard(io.BytesIO()).dump(dict(collection.__dask_graph__()))


def test_each_worker_process_loads_the_bundle_once(client, seed_bundle):
    client.run(nd.clear_cache)
    x = _points(2000, seed=2)
    xd = da.from_array(x, chunks=(50, 2))  # 40 chunks over 2 workers
    client.compute(list(nd.partials(seed_bundle, xd)), sync=True)
    client.compute(nd.partials(seed_bundle, dd.from_array(x, columns=COLS, chunksize=100)), sync=True)
    infos = client.run(nd.cache_info)
    loads = [dict(i["loads"]) for i in infos.values()]
    assert len(infos) == 2 and len({i["pid"] for i in infos.values()}) == 2
    keys = {k for d in loads for k in d}
    assert len(keys) == 1, keys
    (key,) = keys
    assert key[0] == os.path.abspath(seed_bundle) and key[2:] == ("onnxruntime", None, None)
    assert key[1] == hashlib.sha256(open(os.path.join(seed_bundle, "manifest.json"), "rb").read()).hexdigest()
    assert all(d.get(key, 0) <= 1 for d in loads), loads  # at most one load per process, over 60 chunks
    assert sum(d.get(key, 0) for d in loads) >= 1
    assert os.getpid() not in {i["pid"] for i in infos.values()}  # the loads counted are the workers' own


def _die_once(block, marker, block_id=None):
    """Kill the worker process that computes block 6, the first time only (the marker file says it happened)."""
    if block_id[0] == 6:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return block
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)
    return block


def test_a_killed_worker_process_loses_nothing(client, seed_bundle, tmp_path):
    marker = str(tmp_path / "killed")
    before = set(client.run(os.getpid).values())
    x = _points(1000, seed=3)
    xd = da.from_array(x, chunks=(100, 2)).map_blocks(_die_once, marker, dtype=x.dtype)
    y, dy = client.compute(list(nd.partials(seed_bundle, xd)), sync=True)
    assert os.path.exists(marker)
    killed = int(open(marker).read())
    assert killed in before  # a worker of the cluster died during the run ...
    client.wait_for_workers(2, timeout=60)
    after = set(client.run(os.getpid).values())
    assert len(after) == 2 and killed not in after and len(after & before) == 1  # ... and was replaced
    ry, rdy = _by_chunks(nnpartials.Partials(seed_bundle), x, [100] * 10)  # ... and the result is complete
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(dy, rdy)


def test_api_errors_come_before_any_work(seed_bundle):
    with pytest.raises(nd.OrderNotAvailableError, match="second derivatives") as e:
        nd.partials(seed_bundle, da.zeros((4, 2)), order=2)
    assert isinstance(e.value, NotImplementedError) and isinstance(e.value, NNPartialsError)
    with pytest.raises(InputError, match="order must be 1"):
        nd.partials(seed_bundle, da.zeros((4, 2)), order=3)
    with pytest.raises(InputError, match=r"lack the model's columns \['x2'\]"):
        nd.partials(seed_bundle, dd.from_pandas(pd.DataFrame({"x1": [1.0], "z": [2.0]}), npartitions=1))
    with pytest.raises(InputTypeError, match="numeric"):
        nd.partials(seed_bundle, dd.from_pandas(pd.DataFrame({"x1": [1.0], "x2": ["a"]}), npartitions=1))
    with pytest.raises(InputError, match=r"shape \[N, 2\]"):
        nd.partials(seed_bundle, da.zeros((4, 3)))
    with pytest.raises(InputTypeError, match="Dask array"):
        nd.partials(seed_bundle, np.zeros((4, 2)))
    with pytest.raises(InputError, match="nan_policy"):
        nd.partials(seed_bundle, da.zeros((4, 2)), nan_policy="ignore")
    with pytest.raises(NNPartialsError, match="not a folder"):
        nd.partials(os.path.join(seed_bundle, "nowhere"), da.zeros((4, 2)))


def test_nan_in_a_chunk_is_reported_with_its_rows(client, seed_bundle):
    x = _points(300)
    x[250, 1] = np.nan
    y, dy = nd.partials(seed_bundle, da.from_array(x, chunks=(100, 2)))
    with pytest.raises(InputError, match=r"rows 200\.\.299: .*finite"):
        client.compute([y, dy], sync=True)
    y, dy = client.compute(list(nd.partials(seed_bundle, da.from_array(x, chunks=(100, 2)),
                                            nan_policy="propagate")), sync=True)
    assert np.isnan(dy[250]).all() and np.isfinite(dy[:250]).all()


# ---- the command line: Parquet ----------------------------------------------------------------------------------

def _write_inputs(folder, x, files=3, row_group=40):
    """x split over several Parquet files with the columns shuffled (x2, an id, x1) and small row groups."""
    folder.mkdir()
    bounds = np.linspace(0, len(x), files + 1).astype(int)
    for k in range(files):
        s, e = bounds[k], bounds[k + 1]
        t = pa.table({"x2": x[s:e, 1], "id": np.arange(s, e), "x1": x[s:e, 0].astype(np.float32)})
        pq.write_table(t, folder / f"part.{k}.parquet", row_group_size=row_group)
    return folder


def _check_table(out, x, bundle):
    got = pd.read_parquet(out)
    assert list(got.columns) == TABLE
    np.testing.assert_array_equal(got["x2"].to_numpy(), x[:, 1])
    np.testing.assert_array_equal(got["x1"].to_numpy(), x[:, 0].astype(np.float32))
    y, dy = nnpartials.Partials(bundle).jacobian(np.stack([x[:, 0].astype(np.float32), x[:, 1]], axis=1))
    np.testing.assert_allclose(got["y"].to_numpy(), y[:, 0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got[["dy/dx1", "dy/dx2"]].to_numpy(), dy[:, 0, :], rtol=1e-6, atol=1e-9)
    return got


def test_cli_parquet_with_workers(seed_bundle, tmp_path, capsys):
    """A folder of three files, columns in another order, --chunk smaller than every file: --workers 2."""
    x = _points(700, seed=4)
    inp = _write_inputs(tmp_path / "in", x)
    out = tmp_path / "out.parquet"
    assert main(["partials", seed_bundle, "-i", str(inp), "-o", str(out), "--workers", "2", "--chunk", "64",
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert "700 points" in capsys.readouterr().out
    assert out.is_dir() and all(n.startswith("part.") for n in os.listdir(out))
    _check_table(out, x, seed_bundle)
    assert _no_leftovers(tmp_path)


def test_cli_parquet_on_a_cluster_one_partition_per_row_group(client, seed_bundle, tmp_path, capsys):
    """The workers get one partition per row group of the input, not one per file: Dask's read_parquet puts a whole
    file of less than 256 MiB into one partition by default, so a single input file of 10^7 points ran on one worker
    whatever --workers said, and that worker held all of it. The part files are numbered with a fixed width, so that
    pandas and pyarrow, which read a folder's files in name order (part.10 before part.2), read the rows in order."""
    x = _points(600, seed=9)
    inp = _write_inputs(tmp_path / "in", x, files=2, row_group=50)  # 2 files x 6 row groups
    out = tmp_path / "out.parquet"
    assert main(["partials", seed_bundle, "-i", str(inp), "-o", str(out), "--scheduler", client.scheduler.address,
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert "12 part file(s)" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == [f"part.{k:02d}.parquet" for k in range(12)]
    assert [pq.ParquetFile(out / f"part.{k:02d}.parquet").metadata.num_rows for k in range(12)] == [50] * 12
    _check_table(out, x, seed_bundle)  # pandas reads the folder in name order: the rows come back in input order


def test_cli_parquet_on_an_existing_scheduler_and_no_clobber(client, seed_bundle, tmp_path, capsys):
    x = _points(300, seed=5)
    _write_inputs(tmp_path / "in", x, files=2)
    out = tmp_path / "out.parquet"
    argv = ["partials", seed_bundle, "-i", str(tmp_path / "in" / "*.parquet"), "-o", str(out),
            "--scheduler", client.scheduler.address, "--chunk", "32", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    _check_table(out, x, seed_bundle)
    (out / "part.0.parquet").unlink()  # a changed folder: replaced only with -f
    assert main(argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["-f"]) == 0
    _check_table(out, x, seed_bundle)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine.parquet").mkdir()
    (tmp_path / "mine.parquet" / "notes.txt").write_text("keep me")
    argv[5] = str(tmp_path / "mine.parquet")
    assert main(argv + ["-f"]) == 1
    assert "other files than Parquet" in capsys.readouterr().err
    assert (tmp_path / "mine.parquet" / "notes.txt").read_text() == "keep me" and _no_leftovers(tmp_path)


def test_cli_parquet_streams_in_process(seed_bundle, tmp_path, capsys):
    """Without --workers: record batches of --chunk rows in, one row group per batch out; columns by name."""
    x = _points(500, seed=6)
    _write_inputs(tmp_path / "in", x, files=1, row_group=200)
    out = tmp_path / "out.parquet"
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "in" / "part.0.parquet"), "-o", str(out),
                 "--chunk", "64"]) == 0, capsys.readouterr().err
    assert out.is_file()
    got = _check_table(out, x, seed_bundle)
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == 500 and meta.num_row_groups >= 500 // 64  # written batch by batch
    # the same table from .npy points, and Parquet in to .npz out
    np.save(tmp_path / "x.npy", np.stack([x[:, 0].astype(np.float32), x[:, 1]], axis=1))
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "n.parquet")]) == 0
    np.testing.assert_array_equal(pd.read_parquet(tmp_path / "n.parquet")[TABLE[2:]].to_numpy(),
                                  got[TABLE[2:]].to_numpy())
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o.npz")]) == 0
    with np.load(tmp_path / "o.npz") as z:
        np.testing.assert_array_equal(z["dy_dx"][:, 0, :], got[["dy/dx1", "dy/dx2"]].to_numpy())


def test_cli_parquet_empty_input(client, seed_bundle, tmp_path):
    pq.write_table(pa.table({"x1": pa.array([], pa.float64()), "x2": pa.array([], pa.int32())}), tmp_path / "e.parquet")
    for extra in ([], ["--scheduler", client.scheduler.address]):
        out = tmp_path / f"out{len(extra)}.parquet"
        assert main(["partials", seed_bundle, "-i", str(tmp_path / "e.parquet"), "-o", str(out), *extra]) == 0
        got = pd.read_parquet(out)
        assert list(got.columns) == TABLE and len(got) == 0 and str(got["x2"].dtype) == "int32"


def test_cli_parquet_interrupted_leaves_no_output(seed_bundle, tmp_path, monkeypatch):
    x = _points(300, seed=7)
    _write_inputs(tmp_path / "in", x, files=1)
    real, calls = pq.ParquetWriter.write_batch, []

    def write_one_then_interrupt(self, batch, *a, **kw):
        calls.append(batch.num_rows)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, batch, *a, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_batch", write_one_then_interrupt)
    out = tmp_path / "out.parquet"
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "in"), "-o", str(out), "--chunk", "50"]) == 130
    assert calls == [50, 50] and not out.exists() and _no_leftovers(tmp_path)


def test_cli_parquet_interrupted_on_a_cluster_leaves_no_output(client, seed_bundle, tmp_path, monkeypatch):
    import distributed

    real = distributed.as_completed

    def all_parts_then_interrupt(futures, *a, **kw):
        yield from real(futures, *a, **kw)  # every part file is written into the temporary folder ...
        raise KeyboardInterrupt  # ... and the run stops before the folder is renamed

    monkeypatch.setattr(distributed, "as_completed", all_parts_then_interrupt)
    _write_inputs(tmp_path / "in", _points(200), files=2)
    out = tmp_path / "out.parquet"
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "in"), "-o", str(out),
                 "--scheduler", client.scheduler.address, "--no-progress"]) == 130
    assert not out.exists() and _no_leftovers(tmp_path)


def test_cli_parquet_input_errors(seed_bundle, tmp_path, capsys):
    pq.write_table(pa.table({"x1": [1.0], "z": [2.0]}), tmp_path / "a.parquet")
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "a.parquet"), "-o", str(tmp_path / "o.parquet")]) == 1
    err = capsys.readouterr().err
    assert "lack the model's columns ['x2']" in err and "Traceback" not in err, err
    pq.write_table(pa.table({"x1": [1.0], "x2": ["a"]}), tmp_path / "b.parquet")
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "b.parquet"), "-o", str(tmp_path / "o.parquet")]) == 1
    assert "column 'x2' has Arrow type string" in capsys.readouterr().err
    pq.write_table(pa.table({"x1": [1.0, None, 3.0], "x2": [1.0, 2.0, 3.0]}), tmp_path / "c.parquet")
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "c.parquet"), "-o", str(tmp_path / "o.parquet")]) == 1
    assert "missing (null) value in column 'x1' at row 1" in capsys.readouterr().err
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "no*.parquet"), "-o", str(tmp_path / "o.parquet")]) == 1
    assert "matches no files" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    assert main(["partials", seed_bundle, "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.parquet"),
                 "--workers", "2"]) == 1
    assert "read and write Parquet" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists() and _no_leftovers(tmp_path)
