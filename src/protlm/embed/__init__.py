"""Embeddings at proteome scale: per-residue and per-protein arrays from any encoder layer, in memory or in
resumable HDF5 files (format in :mod:`protlm.embed.store`)."""

import sys

from protlm.embed.run import EmbedOptions, EmbedSummary, Embedding, embed, embed_files, embed_iter
from protlm.embed.store import EmbeddingStore, EmbeddingWriter

__all__ = ["embed", "embed_iter", "embed_files", "EmbedOptions", "EmbedSummary", "Embedding", "EmbeddingStore",
           "EmbeddingWriter"]


class _CallableModule(type(sys.modules[__name__])):
    """``protlm.embed(...)`` must keep working after this package is imported: importing a submodule rebinds the
    name ``protlm.embed`` from the function to this package, so the package forwards calls to :func:`embed`."""

    def __call__(self, *args, **kwargs):
        return embed(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
