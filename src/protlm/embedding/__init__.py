"""Embeddings at proteome scale: per-residue and per-protein arrays from any encoder layer, in memory or in
resumable HDF5 files (format in :mod:`protlm.embedding.store`)."""

from protlm.embedding.run import EmbedOptions, EmbedSummary, Embedding, embed, embed_files, embed_iter
from protlm.embedding.store import EmbeddingStore, EmbeddingWriter

__all__ = ["embed", "embed_iter", "embed_files", "EmbedOptions", "EmbedSummary", "Embedding", "EmbeddingStore",
           "EmbeddingWriter"]

