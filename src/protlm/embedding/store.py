"""The embeddings file format (HDF5, readable by bio_embeddings-style readers).

Layout:
- one dataset per sequence at the root, named by a safe key (the id with characters HDF5 cannot hold in a
  name replaced; when two ids would get the same key, each gets ``~`` and a short hash of the id appended), with
  ``attrs["original_id"]`` holding the FASTA id: read by original id, not by dataset name;
- per-residue arrays are (L, D), per-protein arrays are (D,);
- when several layers are stored, arrays gain a leading layer axis: (n_layers, L, D) or (n_layers, D), and the
  file attribute ``layers`` lists them in order;
- file attributes: ``model``, ``layers``, ``prefix``, ``dtype``, ``kind`` ("per_residue" / "per_protein"),
  ``protlm_version``; files written by :class:`EmbeddingWriter` also carry ``window`` and ``overlap`` (the
  long-protein rule, see :mod:`protlm.embedding.batching`), ``family`` and ``store_dtype``, and ``model_name``
  (the same value as ``model``), the root attribute protspace (Rostlab's projection tool) names an embedding set
  by; protspace takes dataset names as protein ids and biotrainer (up to 0.9) reads ``original_id``, which this
  layout already gives them;
- each dataset also has ``attrs["sequence_sha1"]`` (of the upper-case residue string), so that a resumed run
  can tell an id whose sequence changed.

Reading (:class:`EmbeddingStore`) also takes biotrainer 1.x's files, which name each dataset by a hash of its
sequence (:func:`biotrainer_hash`) and keep the FASTA id in ``attrs["original_id"]``: ids are read from
``original_id`` wherever a dataset has one, and a reader that knows the sequences finds a protein the file names
by no id through the hash of its sequence (two records of one sequence share biotrainer's one dataset).

Writing never leaves an unreadable file. HDF5 is not crash-safe while a file is open for writing, so the output
file is only ever replaced whole (written beside it, then renamed over it). Work in progress goes to segment
files in ``<output>.parts/``, each itself written and renamed in one step; a merge copies the output and the
segments into a new output file. A run killed at any moment leaves the output file as it was at the last merge
(created empty, with its attributes, when the run starts) plus complete segments, which the next run reads
back as done and merges.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import time
import uuid
from typing import Iterator, Mapping

import numpy as np

from protlm.errors import InputError

_UNSAFE = re.compile(r"[/.\s]")


def safe_key(original_id: str) -> str:
    """An HDF5-safe dataset name for an id ('/' separates groups, '.' names are reserved)."""
    key = _UNSAFE.sub("_", original_id)
    return key if key and key not in (".", "..") else "_"


def biotrainer_hash(sequence: str) -> str:
    """The dataset name biotrainer 1.x gives a sequence's embedding: SHA-256 (hex) of ``"<sequence>_<length>"``."""
    return hashlib.sha256(f"{sequence}_{len(sequence)}".encode()).hexdigest()


class EmbeddingStore:
    """Read-only view of an embeddings file: a mapping from original id to array.

    ``layer`` picks one layer from a multi-layer file (a value from the file's ``layers`` attribute).
    ``sequences`` (id -> sequence, the proteins a caller will ask for) lets an id the file does not name be found
    by the hash of its sequence, the dataset name of biotrainer's files; :meth:`ids` lists the file's own ids.
    """

    def __init__(self, path: str | os.PathLike, layer: int | None = None,
                 sequences: Mapping[str, str] | None = None):
        import h5py

        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise InputError(f"{self.path}: no such embeddings file")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise InputError(f"{self.path}: not a readable HDF5 file ({err})") from None
        self.attrs = {k: _plain(v) for k, v in self._h5.attrs.items()}
        layers = self.attrs.get("layers")
        self.layers = [int(x) for x in np.atleast_1d(layers)] if layers is not None else None
        self.multi_layer = self.layers is not None and len(self.layers) > 1
        self._layer_index = None
        if layer is not None and self.multi_layer:
            if layer not in self.layers:
                raise InputError(f"{self.path}: layer {layer} not stored (has {self.layers})")
            self._layer_index = self.layers.index(layer)
        elif layer is not None and self.layers is not None and layer not in self.layers:
            raise InputError(f"{self.path}: layer {layer} not stored (has {self.layers})")
        self._keys = {}
        for key, ds in self._h5.items():
            self._keys[str(_plain(ds.attrs.get("original_id", key)))] = key
        self._by_sequence = {}  # id -> dataset key, for ids found by their sequence's hash
        for oid, seq in (sequences or {}).items():
            if oid not in self._keys:
                key = biotrainer_hash(seq)
                if key in self._h5:
                    self._by_sequence[oid] = key

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, original_id: str) -> bool:
        return original_id in self._keys or original_id in self._by_sequence

    def ids(self) -> list[str]:
        return list(self._keys)

    def __getitem__(self, original_id: str) -> np.ndarray:
        key = self._keys.get(original_id) or self._by_sequence.get(original_id)
        if key is None:
            raise InputError(f"{self.path}: no embedding for id {original_id!r}")
        arr = self._h5[key][()]
        if self.multi_layer:
            arr = arr[self._layer_index if self._layer_index is not None else -1]
        return arr

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for oid in self._keys:
            yield oid, self[oid]

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.dtype.kind in "SO":
        return [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


# --- writing -------------------------------------------------------------------------------------------------
# File attributes that must agree for a run to add to an existing file (anything else would mix embeddings).
RESUME_ATTRS = ("model", "layers", "prefix", "dtype", "kind", "window", "overlap", "store_dtype")
SEGMENT_PATTERN = "seg-*.h5"
_MERGE_MIN_BYTES = 256 * 2**20  # below this, segments wait for the final merge


def sequence_sha1(sequence: str) -> str:
    return hashlib.sha1(sequence.upper().encode("ascii", "backslashreplace")).hexdigest()


def check_output_path(path: str | os.PathLike, mkdir: bool = False) -> str:
    """The output path, checked before any work starts: its directory must exist (or be created with
    ``mkdir``) and be writable, and the path must not be a directory."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory; give a file name such as {os.path.join(path, 'embeddings.h5')}")
    if not os.path.isdir(directory):
        if mkdir:
            os.makedirs(directory, exist_ok=True)
        else:
            raise InputError(f"{path}: directory {directory} does not exist (create it, or pass --mkdir)")
    if not os.access(directory, os.W_OK):
        raise InputError(f"{path}: directory {directory} is not writable")
    return path


class EmbeddingWriter:
    """Adds datasets to one embeddings file; see the module docstring for why it never corrupts the file.

    Use: :meth:`start` (process 0 only: lock, create or check the file), :meth:`done` (what is already stored),
    :meth:`add` per sequence with :meth:`maybe_flush` after each batch, then :meth:`flush` and, on process 0,
    :meth:`merge` and :meth:`close`. ``rank`` keeps segment names apart when several processes write.
    """

    def __init__(self, path: str | os.PathLike, attrs: dict, rank: int = 0, checkpoint_seconds: float = 30.0,
                 store_dtype: str = "float32"):
        self.path = os.fspath(path)
        self.parts = self.path + ".parts"
        self.attrs = dict(attrs)
        if "model" in self.attrs:  # protspace reads the embedder's name from this root attribute
            self.attrs.setdefault("model_name", self.attrs["model"])
        self.rank = rank
        self.checkpoint_seconds = checkpoint_seconds
        self.store_dtype = np.dtype(store_dtype)
        self._buffer: list[tuple[str, str, np.ndarray, str]] = []
        self._buffer_bytes = 0
        self._last_flush = time.monotonic()
        self._n_segments = 0
        self._lock = None
        self.notes: list[str] = []  # things the user should hear about (unreadable segments)

    # --- setup (process 0) ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Take the lock, remove temporary files of killed runs, create the file or check it matches."""
        os.makedirs(self.parts, exist_ok=True)
        self._lock = _acquire_lock(os.path.join(self.parts, "lock"), self.path)
        directory = os.path.dirname(os.path.abspath(self.path))
        stale = glob.glob(os.path.join(glob.escape(directory), ".tmp-" + glob.escape(os.path.basename(self.path)) + "-*"))
        stale += glob.glob(os.path.join(glob.escape(self.parts), ".tmp-*"))
        for tmp in stale:  # left by a run killed while writing; we hold the lock, so no one else owns them
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if os.path.exists(self.path):
            self._check_attrs(self.path)
        else:
            self._write_file(segments=[])
        for seg in self._segments():
            self._check_attrs(seg)

    def _check_attrs(self, path: str) -> None:
        import h5py

        try:
            with h5py.File(path, "r") as fh:
                have = {k: _plain(fh.attrs.get(k)) for k in RESUME_ATTRS}
        except OSError as err:
            if os.path.dirname(path) == self.parts:
                return  # an unreadable segment is set aside by done()
            raise InputError(f"{path}: exists but is not a readable HDF5 file ({err}); move it away or "
                             "choose another output path") from None
        want = {k: _plain(_attr_value(self.attrs.get(k))) for k in RESUME_ATTRS}
        diff = [k for k in RESUME_ATTRS if _norm(have[k]) != _norm(want[k])]
        if diff:
            shown = "; ".join(f"{k} {have[k]!r} here vs {want[k]!r} now" for k in diff)
            raise InputError(f"{path}: holds embeddings made with other settings ({shown}); "
                             "delete it or choose another output path")

    # --- what is stored ---------------------------------------------------------------------------------------
    def done(self) -> dict[str, tuple[str, str]]:
        """original id -> (dataset key, sequence_sha1) for every dataset in the file and in complete segments."""
        out: dict[str, tuple[str, str]] = {}
        if os.path.exists(self.path):
            out.update(_index(self.path))
        for seg in self._segments():
            try:
                out.update(_index(seg))
            except OSError:
                # Segments are renamed into place only when complete, so this is outside damage; recompute.
                with contextlib.suppress(OSError):
                    os.replace(seg, seg + ".unreadable")
                self.notes.append(f"{seg}: unreadable segment set aside; its proteins are embedded again")
        return out

    def _segments(self) -> list[str]:
        return sorted(glob.glob(os.path.join(glob.escape(self.parts), SEGMENT_PATTERN)))

    # --- adding -----------------------------------------------------------------------------------------------
    def add(self, original_id: str, key: str, array: np.ndarray, seq_sha1: str) -> None:
        arr = np.asarray(array, dtype=self.store_dtype)
        self._buffer.append((original_id, key, arr, seq_sha1))
        self._buffer_bytes += arr.nbytes

    def maybe_flush(self) -> bool:
        """Write a segment when ``checkpoint_seconds`` have passed since the last one (or 256 MiB are buffered)."""
        if self._buffer and (time.monotonic() - self._last_flush >= self.checkpoint_seconds
                             or self._buffer_bytes >= _MERGE_MIN_BYTES):
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Write the buffered datasets as one complete segment file."""
        from protlm.utils import atomic_path

        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        import h5py

        self._n_segments += 1
        name = f"seg-r{self.rank:04d}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
        with atomic_path(os.path.join(self.parts, name)) as tmp:
            with h5py.File(tmp, "w") as fh:
                _set_attrs(fh, self.attrs)
                for oid, key, arr, sha in self._buffer:
                    ds = fh.create_dataset(key, data=arr)
                    ds.attrs["original_id"] = oid
                    ds.attrs["sequence_sha1"] = sha
            _fsync(tmp)
        self._buffer, self._buffer_bytes = [], 0

    def pending_bytes(self) -> int:
        return sum(os.path.getsize(s) for s in self._segments())

    def maybe_merge(self) -> bool:
        """Merge when the segments outgrow the file (and 256 MiB): the file stays close to current while the
        total copying stays within about twice the final size."""
        pending = self.pending_bytes()
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        if pending >= max(size, _MERGE_MIN_BYTES):
            self.merge()
            return True
        return False

    # --- merging (process 0) ----------------------------------------------------------------------------------
    def merge(self) -> int:
        """Rewrite the file with the segments folded in (one atomic rename), then delete the segments.

        Returns the number of datasets in the new file."""
        segments = self._segments()
        if not segments and os.path.exists(self.path):
            return len(_index(self.path))
        n = self._write_file(segments)
        for seg in segments:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(seg)
        return n

    def _write_file(self, segments: list[str]) -> int:
        import h5py

        from protlm.utils import atomic_path

        sources = ([self.path] if os.path.exists(self.path) else []) + segments
        with atomic_path(self.path) as tmp:
            with h5py.File(tmp, "w") as out:
                _set_attrs(out, self.attrs)
                for src in sources:
                    with h5py.File(src, "r") as fh:
                        for key, ds in fh.items():
                            if key in out:
                                # a segment merged before a kill, found again: same protein, keep one copy
                                if _plain(out[key].attrs.get("original_id")) == _plain(ds.attrs.get("original_id")):
                                    continue
                                raise InputError(f"{src}: dataset {key!r} ({_plain(ds.attrs.get('original_id'))!r}) "
                                                 f"collides with {_plain(out[key].attrs.get('original_id'))!r}")
                            fh.copy(ds, out, name=key)
                n = len(out)
            _fsync(tmp)
        return n

    def close(self, remove_parts: bool = False) -> None:
        """Release the lock; with ``remove_parts`` (after a final merge) delete the empty work directory."""
        if self._lock is not None:
            if remove_parts and not self._segments():
                for name in os.listdir(self.parts):
                    if name == "lock" or name.startswith(".tmp-"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(self.parts, name))
                with contextlib.suppress(OSError):
                    os.rmdir(self.parts)
            self._lock.close()
            self._lock = None


def _index(path: str) -> dict[str, tuple[str, str]]:
    import h5py

    out = {}
    with h5py.File(path, "r") as fh:
        for key, ds in fh.items():
            out[str(_plain(ds.attrs.get("original_id", key)))] = (key, str(_plain(ds.attrs.get("sequence_sha1", ""))))
    return out


def _set_attrs(fh, attrs: dict) -> None:
    for k, v in attrs.items():
        fh.attrs[k] = _attr_value(v)


def _attr_value(v):
    if isinstance(v, (list, tuple)):
        return np.asarray(v, dtype=np.int64)
    return "none" if v is None else v


def _norm(v):
    if isinstance(v, (list, tuple, np.ndarray)):
        return [int(x) for x in np.atleast_1d(v)]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _acquire_lock(lock_path: str, output: str):
    """An exclusive lock held for the run; the OS drops it when the process dies (kill -9 included)."""
    fh = open(lock_path, "a+")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent runs on one output are the user's business
        return fh
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise InputError(f"{output}: another protlm embed run is writing this file (lock {lock_path})") from None
    return fh
