"""Sequence files and training data streams."""

from protlm.data.fasta import Record, ReadStats, read_csv_sequences, read_fasta, read_sequences

__all__ = ["Record", "ReadStats", "read_csv_sequences", "read_fasta", "read_sequences"]
