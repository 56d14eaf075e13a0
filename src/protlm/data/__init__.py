"""Sequence files and training data streams."""

from protlm.data.exclude import Exclusion
from protlm.data.fasta import Record, ReadStats, read_csv_sequences, read_fasta, read_sequences
from protlm.data.stream import SequenceStream, Shard, StreamItem

__all__ = ["Exclusion", "Record", "ReadStats", "SequenceStream", "Shard", "StreamItem", "read_csv_sequences",
           "read_fasta", "read_sequences"]
