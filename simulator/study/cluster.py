"""Sweeps in chunks: each chunk of configurations one task, in this process or on Dask.

With a folder, every finished chunk is written there as ``chunk-<first row>.parquet`` (beside a
``manifest.json`` naming the sweep it belongs to), so a study that was interrupted resumes where
it stopped: chunks whose file exists are read, not recomputed. Dask runs the chunks on a
``LocalCluster`` by default, or on the cluster of a scheduler address
(``tcp://HOST:PORT``); its workers need InferSim installed and the model and hardware files the
sweep names (shipped names need nothing more).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from simulator.errors import InferSimError
from simulator.study.sweep import evaluate, finish

MANIFEST = "manifest.json"


def evaluate_chunk(configs: pd.DataFrame, fast: bool = True) -> pd.DataFrame:
    """One task: a chunk's rows (run on a worker)."""
    return evaluate(configs.reset_index(drop=True), fast=fast, progress=False)


def _digest(configs: pd.DataFrame) -> str:
    hashed = pd.util.hash_pandas_object(configs.astype(str), index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes() + json.dumps(list(configs.columns)).encode()).hexdigest()


def _chunk_path(folder: Path, start: int) -> Path:
    return folder / f"chunk-{start:012d}.parquet"


def _claim(folder: Path, configs: pd.DataFrame, chunk_size: int) -> None:
    """Write the manifest, or check that the folder's chunks are this sweep's."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"configurations": len(configs), "chunk_size": chunk_size, "digest": _digest(configs)}
    path = folder / MANIFEST
    if path.exists():
        found = json.loads(path.read_text())
        if found != manifest:
            raise InferSimError(
                f"{folder} holds the chunks of another sweep ({found.get('configurations')} configurations "
                f"in chunks of {found.get('chunk_size')}; this one has {len(configs)} in chunks of "
                f"{chunk_size}): delete it, or write this study elsewhere")
        return
    path.write_text(json.dumps(manifest, indent=2))


def _write(frame: pd.DataFrame, path: Path) -> None:
    """Atomically: a chunk file exists only once it is whole."""
    partial = path.with_suffix(".partial")
    frame.to_parquet(partial, index=False)
    os.replace(partial, path)


@contextmanager
def _client(scheduler: Any, workers: int | None) -> Iterator[Any]:
    """A Dask client: the one given, one to a scheduler address, or one on a new LocalCluster."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - a dependency, but optional at run time
        raise InferSimError("Dask is not installed: pip install 'dask[distributed]'") from None
    if not isinstance(scheduler, str):
        yield scheduler
        return
    if scheduler != "local":
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as err:
            raise InferSimError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def _bar(total: int, done: int, show: bool | None):
    import sys
    from contextlib import nullcontext

    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import Progress

    return Progress(console=Console(stderr=True), transient=True)


def run_chunks(configs: pd.DataFrame, folder: Path | None = None, chunk_size: int = 50_000,
               scheduler: Any = None, workers: int | None = None, fast: bool = True,
               progress: bool | None = None) -> pd.DataFrame:
    """The sweep's rows, chunk by chunk: in this process (``scheduler=None``), on a new
    ``LocalCluster`` (``"local"``, ``workers`` processes), on a scheduler's cluster
    (``"tcp://HOST:PORT"``) or through a ``dask.distributed.Client``. With ``folder`` the
    chunks are kept there and the ones already there are not recomputed."""
    if chunk_size < 1:
        raise InferSimError(f"chunk size must be at least 1, got {chunk_size}")
    starts = list(range(0, len(configs), chunk_size))
    done: dict[int, pd.DataFrame] = {}
    if folder is not None:
        _claim(folder, configs, chunk_size)
        todo = [s for s in starts if not _chunk_path(folder, s).exists()]
    else:
        todo = starts

    def finished(start: int, frame: pd.DataFrame, bar: Any, task: Any) -> None:
        if folder is not None:
            _write(frame, _chunk_path(folder, start))
        else:
            done[start] = frame
        if bar is not None:
            bar.advance(task)

    with _bar(len(starts), len(starts) - len(todo), progress) as bar:
        task = (bar.add_task("chunks of configurations", total=len(starts), completed=len(starts) - len(todo))
                if bar is not None else None)
        if scheduler is None:
            for start in todo:
                finished(start, evaluate_chunk(configs.iloc[start:start + chunk_size], fast), bar, task)
        elif todo:
            from dask.distributed import as_completed

            with _client(scheduler, workers) as client:
                futures = {client.submit(evaluate_chunk, configs.iloc[start:start + chunk_size], fast,
                                         pure=False): start for start in todo}
                for future in as_completed(futures):
                    finished(futures[future], future.result(), bar, task)
                    future.release()
    frames = [done[s] if folder is None else pd.read_parquet(_chunk_path(folder, s)) for s in starts]
    frame = finish(configs, pd.concat(frames, ignore_index=True))
    frame.attrs = {"as_arrays": sum(int(f.attrs.get("as_arrays", 0)) for f in frames)}
    return frame
