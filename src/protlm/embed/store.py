"""The embeddings file format (HDF5, readable by bio_embeddings-style readers).

Layout:
- one dataset per sequence at the root, named by a safe key (the id with characters HDF5 cannot hold in a
  name replaced), with ``attrs["original_id"]`` holding the FASTA id;
- per-residue arrays are (L, D), per-protein arrays are (D,);
- when several layers are stored, arrays gain a leading layer axis: (n_layers, L, D) or (n_layers, D), and the
  file attribute ``layers`` lists them in order;
- file attributes: ``model``, ``layers``, ``prefix``, ``dtype``, ``kind`` ("per_residue" / "per_protein"),
  ``protlm_version``.
"""

from __future__ import annotations

import os
import re
from typing import Iterator

import numpy as np

from protlm.errors import InputError

_UNSAFE = re.compile(r"[/.\s]")


def safe_key(original_id: str) -> str:
    """An HDF5-safe dataset name for an id ('/' separates groups, '.' names are reserved)."""
    key = _UNSAFE.sub("_", original_id)
    return key if key and key not in (".", "..") else "_"


class EmbeddingStore:
    """Read-only view of an embeddings file: a mapping from original id to array.

    ``layer`` picks one layer from a multi-layer file (a value from the file's ``layers`` attribute).
    """

    def __init__(self, path: str | os.PathLike, layer: int | None = None):
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

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, original_id: str) -> bool:
        return original_id in self._keys

    def ids(self) -> list[str]:
        return list(self._keys)

    def __getitem__(self, original_id: str) -> np.ndarray:
        try:
            key = self._keys[original_id]
        except KeyError:
            raise InputError(f"{self.path}: no embedding for id {original_id!r}") from None
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
