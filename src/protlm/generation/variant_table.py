"""Variant tables on disk: the wild type, a CSV of variants, and how well scores rank a measured column.

A CSV names its variants either in a mutation column (``A23G``, ``A23G:V40L``) or as full mutated sequences
(FLIP style). ``read_variant_csv`` returns the rows it kept with their parsed variants, so that scores can be
written back beside the original columns; every error names the file and line.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from protlm.errors import InputError
from protlm.generation.mutations import Variant, parse_variant, variant_from_sequence

MUTATION_COLUMNS = ("mutant", "mutation", "mutations", "variant", "variants", "mutant_name")
SEQUENCE_COLUMNS = ("sequence", "mutated_sequence", "seq")


@dataclass
class VariantTable:
    path: str
    header: list[str]
    rows: list[list[str]]  # the kept rows, as read
    variants: list[Variant]  # one per row


def read_wildtype(spec: str, record_id: str | None = None) -> tuple[str, str]:
    """(id, sequence) of the wild type: a FASTA file (its only record, or ``record_id``) or a sequence itself."""
    from protlm.data.fasta import read_fasta

    if not os.path.exists(spec):
        if spec.isalpha():
            return "wildtype", spec.upper()
        raise InputError(f"{spec}: no such file (give a FASTA file or the wild-type sequence itself)")
    records = list(read_fasta(spec))
    if record_id is not None:
        records = [r for r in records if r.id == record_id]
        if not records:
            raise InputError(f"{spec}: no record {record_id!r}")
    elif len(records) > 1:
        raise InputError(f"{spec}: {len(records)} records; choose the wild type with --wildtype-id")
    return records[0].id, records[0].sequence


def parse_where(filters: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """``COL=VALUE`` row filters as (column, value) pairs."""
    out = []
    for f in filters:
        if "=" not in f:
            raise InputError(f"--where {f!r}: expected COL=VALUE")
        col, value = f.split("=", 1)
        out.append((col.strip(), value.strip()))
    return out


def read_variant_csv(path: str, wildtype: str, *, mutation_column: str | None = None,
                     sequence_column: str | None = None, where: list[str] | tuple[str, ...] = (),
                     first_index: int = 1) -> VariantTable:
    """The rows of a variants CSV (optionally .gz) that pass ``where``, with their variants parsed against
    ``wildtype``. Without a named column, the first of MUTATION_COLUMNS (else SEQUENCE_COLUMNS) is used."""
    from protlm.data.fasta import open_text

    with open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise InputError(f"{path}: empty CSV (no header row)")
        header = [h.strip() for h in header]
        lower = {h.lower(): i for i, h in enumerate(header)}

        def column(name: str | None, candidates) -> int | None:
            if name is not None:
                if name not in header:
                    raise InputError(f"{path}: no column {name!r} (columns: {', '.join(header)})")
                return header.index(name)
            return next((lower[c] for c in candidates if c in lower), None)

        mut_col = column(mutation_column, MUTATION_COLUMNS if sequence_column is None else ())
        seq_col = None if mut_col is not None else column(sequence_column, SEQUENCE_COLUMNS)
        if mut_col is None and seq_col is None:
            raise InputError(f"{path}: no mutation column ({', '.join(MUTATION_COLUMNS)}) or sequence column "
                             f"({', '.join(SEQUENCE_COLUMNS)}); name it with --mutation-column/--sequence-column")
        filters = [(column(c, ()), v) for c, v in parse_where(where)]
        rows, variants = [], []
        for line, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise InputError(f"{path}: line {line}: {len(row)} fields, header has {len(header)}")
            if any(row[i].strip() != v for i, v in filters):
                continue
            at = f"{path} line {line}"
            if mut_col is not None:
                variants.append(parse_variant(row[mut_col], wildtype, first_index, where=at))
            else:
                variants.append(variant_from_sequence(row[seq_col], wildtype, first_index=first_index, where=at))
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: no variant rows" + (f" match {' and '.join(where)}" if where else ""))
    return VariantTable(path, header, rows, variants)


def spearman(table: VariantTable, scores, target: str) -> dict:
    """Spearman's rho between ``scores`` and the numeric column ``target`` (rows without a number are left out)."""
    import numpy as np
    from scipy.stats import spearmanr

    if target not in table.header:
        raise InputError(f"{table.path}: no target column {target!r} (columns: {', '.join(table.header)})")
    i = table.header.index(target)
    y, s = [], []
    for row, score in zip(table.rows, scores):
        try:
            y.append(float(row[i]))
        except ValueError:
            continue  # a missing measurement; the row is still scored, just not correlated
        s.append(score)
    if len(y) < 3:
        raise InputError(f"{table.path}: fewer than 3 numeric values in {target!r}; cannot correlate")
    rho = spearmanr(np.asarray(s), np.asarray(y)).statistic
    return {"target": target, "spearman": float(rho), "n_target": len(y)}
