"""Variant notation: parse ``A23G`` and ``A23G:V40L``, check them against a wild type, diff full sequences.

Positions are 1-based by default (``first_index=1``), as in deep mutational scanning tables. Every error
names the variant and the position, because a variant file with one stale numbering offset usually has it on
every row and the first message must be enough to see it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protlm.errors import InputError

# Only the 20 standard residues can be scored: the score tables of protlm.generation.scoring are over these.
STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
WILDTYPE_NAMES = frozenset({"", "wt", "_wt", "wildtype", "wild-type", "wild_type", "_wildtype"})

_MUTATION = re.compile(r"^([A-Za-z])(-?\d+)([A-Za-z])$")


@dataclass(frozen=True)
class Mutation:
    wt: str  # wild-type residue (one letter, upper case)
    position: int  # 0-based index into the wild-type sequence
    mut: str  # substituted residue

    def label(self, first_index: int = 1) -> str:
        return f"{self.wt}{self.position + first_index}{self.mut}"


@dataclass(frozen=True)
class Variant:
    """One (multi-)substitution variant of a wild type; no mutations means the wild type itself."""

    name: str  # as written by the user, used in error messages and output
    mutations: tuple[Mutation, ...]

    @property
    def positions(self) -> tuple[int, ...]:
        return tuple(m.position for m in self.mutations)

    def apply(self, wildtype: str) -> str:
        seq = list(wildtype)
        for m in self.mutations:
            seq[m.position] = m.mut
        return "".join(seq)

    def label(self, first_index: int = 1) -> str:
        return ":".join(m.label(first_index) for m in self.mutations) or "WT"


def parse_variant(text: str, wildtype: str, first_index: int = 1, where: str = "") -> Variant:
    """Parse ``A23G`` or ``A23G:V40L`` (also ``,``/``;``/whitespace separated) and check it against ``wildtype``.

    ``where`` (e.g. "variants.csv line 7") is prepended to error messages.
    """
    name = text.strip()
    prefix = f"{where}: " if where else ""
    if name.lower() in WILDTYPE_NAMES:
        return Variant(name or "WT", ())
    muts: list[Mutation] = []
    seen: dict[int, str] = {}
    for part in re.split(r"[:,;\s]+", name):
        if not part:
            continue
        m = _MUTATION.match(part)
        if m is None:
            raise InputError(f"{prefix}variant {name!r}: cannot read mutation {part!r} (expected e.g. A23G)")
        wt, pos_text, mut = m.group(1).upper(), m.group(2), m.group(3).upper()
        pos = int(pos_text) - first_index
        for residue in (wt, mut):
            if residue not in STANDARD_RESIDUES:
                raise InputError(f"{prefix}variant {name!r}: unknown residue {residue!r} in {part} "
                                 f"(only the 20 standard residues {STANDARD_RESIDUES} can be scored)")
        if not 0 <= pos < len(wildtype):
            raise InputError(f"{prefix}variant {name!r}: position {pos_text} is outside the wild type "
                             f"({first_index}..{len(wildtype) + first_index - 1})")
        if wildtype[pos] != wt:
            raise InputError(f"{prefix}variant {name!r}: {part} but position {pos_text} is {wildtype[pos]} "
                             "in the wild type (check the numbering offset, --first-index)")
        if pos in seen:
            raise InputError(f"{prefix}variant {name!r}: position {pos_text} is mutated twice ({seen[pos]}, {part})")
        seen[pos] = part
        muts.append(Mutation(wt, pos, mut))
    muts.sort(key=lambda mu: mu.position)
    return Variant(name, tuple(muts))


def variant_from_sequence(sequence: str, wildtype: str, name: str = "", first_index: int = 1,
                          where: str = "") -> Variant:
    """The substitutions that turn ``wildtype`` into ``sequence`` (FLIP-style tables hold whole sequences)."""
    prefix = f"{where}: " if where else ""
    seq = sequence.strip().upper()
    if len(seq) != len(wildtype):
        raise InputError(f"{prefix}sequence has {len(seq)} residues but the wild type has {len(wildtype)}; "
                         "only substitutions can be scored (no insertions or deletions)")
    muts = []
    for i, (w, s) in enumerate(zip(wildtype, seq)):
        if w != s:
            if s not in STANDARD_RESIDUES:
                raise InputError(f"{prefix}unknown residue {s!r} at position {i + first_index}")
            muts.append(Mutation(w, i, s))
    variant = Variant(name, tuple(muts))
    if not name:
        variant = Variant(variant.label(first_index), variant.mutations)
    return variant


def check_wildtype(wildtype: str, record: str = "wild type") -> str:
    seq = wildtype.strip().upper()
    if not seq:
        raise InputError(f"{record}: empty sequence")
    bad = next((i for i, c in enumerate(seq) if c not in STANDARD_RESIDUES + "XUZOB"), None)
    if bad is not None:
        raise InputError(f"{record}: unknown residue {seq[bad]!r} at position {bad + 1}")
    return seq
