"""Labels from 3D structures: residue contacts and DSSP secondary structure.

- Contacts follow Ankh: residues i and j are in contact when their Cβ atoms (Cα for glycine) are closer than
  8 Å. A residue whose Cβ (or Cα for glycine) is missing has unknown contacts (-1), not "no contact".
- Secondary structure comes from the DSSP program (``mkdssp``, Debian package ``dssp``). mkdssp 4.x refuses a
  PDB file without HEADER and CRYST1 records, which the CASP14 target files lack, so a dummy pair is prepended.
  The eight DSSP states reduce to three the usual way: H (G, H, I), E (E, B), C (everything else).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np

from protlm.errors import InputError

THREE_TO_ONE = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E", "GLY": "G", "HIS": "H",
    "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F", "PRO": "P", "SER": "S", "THR": "T", "TRP": "W",
    "TYR": "Y", "VAL": "V", "SEC": "U", "PYL": "O", "MSE": "M", "ASX": "B", "GLX": "Z", "UNK": "X",
}
DSSP8_TO_3 = {"H": "H", "G": "H", "I": "H", "E": "E", "B": "E"}  # every other state is coil, C
CONTACT_CUTOFF = 8.0  # Å, between Cβ atoms (Cα for glycine)


@dataclass
class Residue:
    number: int  # residue sequence number in the file (target numbering for CASP files)
    icode: str  # insertion code, "" when none
    aa: str  # one-letter code
    ca: np.ndarray | None  # (3,) Å
    cb: np.ndarray | None  # (3,) Å

    @property
    def contact_atom(self) -> np.ndarray | None:
        return self.ca if self.aa == "G" else self.cb


def read_pdb_residues(path: str | os.PathLike, chain: str | None = None) -> list[Residue]:
    """Residues of one chain (the first one when ``chain`` is None) in file order; only the first model, only
    the first alternate location of each atom. HETATM MSE (selenomethionine) counts as M."""
    from protlm.data.fasta import open_text

    path = os.fspath(path)
    residues: dict[tuple[int, str], Residue] = {}
    chosen = chain
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            rec = line[:6]
            if rec == "ENDMDL":
                break
            if rec not in ("ATOM  ", "HETATM"):
                continue
            name3 = line[17:20].strip()
            if rec == "HETATM" and name3 != "MSE":
                continue
            if len(line) < 54:
                raise InputError(f"{path}: line {lineno}: ATOM record too short for coordinates")
            ch = line[21]
            if chosen is None:
                chosen = ch
            if ch != chosen:
                continue
            if line[16] not in (" ", "A"):
                continue  # a second alternate location
            try:
                number = int(line[22:26])
                xyz = np.array([float(line[30:38]), float(line[38:46]), float(line[46:54])])
            except ValueError:
                raise InputError(f"{path}: line {lineno}: unreadable residue number or coordinates") from None
            key = (number, line[26].strip())
            res = residues.get(key)
            if res is None:
                res = residues[key] = Residue(number, key[1], THREE_TO_ONE.get(name3, "X"), None, None)
            atom = line[12:16].strip()
            if atom == "CA" and res.ca is None:
                res.ca = xyz
            elif atom == "CB" and res.cb is None:
                res.cb = xyz
    out = [r for r in residues.values() if r.ca is not None]
    if not out:
        raise InputError(f"{path}: no residues with a Cα atom" + (f" in chain {chain!r}" if chain else ""))
    return out


def contact_map(coords: np.ndarray, cutoff: float = CONTACT_CUTOFF) -> np.ndarray:
    """(L, L) int8 from (L, 3) coordinates: 1 closer than ``cutoff``, 0 not, -1 where a coordinate is NaN."""
    d = np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=-1)
    out = (d < cutoff).astype(np.int8)
    unknown = np.isnan(coords).any(-1)
    out[unknown, :] = -1
    out[:, unknown] = -1
    return out


def structure_contacts(residues: list[Residue], cutoff: float = CONTACT_CUTOFF) -> np.ndarray:
    coords = np.array([r.contact_atom if r.contact_atom is not None else [np.nan] * 3 for r in residues], float)
    return contact_map(coords, cutoff)


def virtual_cb(n: np.ndarray, ca: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Cβ positions (L, 3) placed from backbone N, Cα, C with ideal geometry (the constants trRosetta uses), for
    formats that store the backbone only (ProteinNet)."""
    b = ca - n
    c_ = c - ca
    a = np.cross(b, c_)
    return -0.58273431 * a + 0.56802827 * b - 0.54067466 * c_ + ca


# --- DSSP ------------------------------------------------------------------------------------------------------
@dataclass
class DsspChain:
    sequence: str  # one letter per residue DSSP assigned (cystines written as C)
    ss8: str  # DSSP state per residue; a blank state (loop) is written "C"
    numbers: list[int]  # residue numbers
    chain_breaks: int  # break markers ("!") DSSP put between residues


def find_mkdssp(explicit: str | None = None) -> str:
    exe = explicit or os.environ.get("PROTLM_MKDSSP") or "mkdssp"
    found = shutil.which(exe)
    if not found:
        raise InputError(f"{exe}: the DSSP program is not installed (Debian/Ubuntu: apt-get install dssp; "
                         "or point --mkdssp / PROTLM_MKDSSP at it)")
    return found


def run_dssp(pdb_path: str | os.PathLike, mkdssp: str | None = None) -> DsspChain:
    """Run mkdssp on a PDB file (plain or .gz) and parse its classic-format output."""
    from protlm.data.fasta import open_text

    exe = find_mkdssp(mkdssp)
    pdb_path = os.fspath(pdb_path)
    with open_text(pdb_path) as fh:
        body = [ln for ln in fh if not ln.startswith(("HEADER", "CRYST1"))]
    with tempfile.TemporaryDirectory(prefix="protlm-dssp-") as tmp:
        src = os.path.join(tmp, "in.pdb")
        dst = os.path.join(tmp, "out.dssp")
        with open(src, "w", encoding="ascii") as out:
            out.write(f"{'HEADER    PROTLM':<80}\n")
            out.write(f"{'CRYST1    1.000    1.000    1.000  90.00  90.00  90.00 P 1           1':<80}\n")
            out.writelines(body)
        proc = subprocess.run([exe, "--output-format", "dssp", src, dst], capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(dst):
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise InputError(f"{pdb_path}: mkdssp failed ({msg[-1] if msg else f'exit {proc.returncode}'})")
        with open(dst, encoding="ascii", errors="replace") as fh:
            return parse_dssp(fh.read(), pdb_path)


def parse_dssp(text: str, source: str = "<dssp>") -> DsspChain:
    """Residues from DSSP's classic output: columns 6-10 residue number, 14 amino acid ('!' = break,
    lower case = half-cystine), 17 secondary structure."""
    lines = text.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("  #  RESIDUE"))
    except StopIteration:
        raise InputError(f"{source}: DSSP output has no residue table") from None
    seq, ss, nums, breaks = [], [], [], 0
    for ln in lines[start + 1:]:
        if len(ln) < 17:
            continue
        aa = ln[13]
        if aa == "!":
            breaks += 1
            continue
        seq.append("C" if aa.islower() else aa)
        state = ln[16]
        ss.append("C" if state in (" ", "-") else state)
        nums.append(int(ln[5:10]))
    if not seq:
        raise InputError(f"{source}: DSSP assigned no residues")
    return DsspChain("".join(seq), "".join(ss), nums, breaks)


def ss8_to_ss3(ss8: str) -> str:
    return "".join(DSSP8_TO_3.get(s, "C") for s in ss8)


def derive_ssp_table(pdb_paths: list[str], mkdssp: str | None = None, progress=None) -> list[dict[str, str]]:
    """Rows ``id, input, dssp3, dssp8, chain_breaks`` (the CASP14 SSP CSV), one per structure file; the id is the
    file name without ``.pdb`` / ``.pdb.gz``."""
    rows = []
    for path in pdb_paths:
        chain = run_dssp(path, mkdssp)
        name = os.path.basename(path)
        for ext in (".gz", ".pdb", ".ent", ".cif"):
            name = name.removesuffix(ext)
        rows.append({"id": name, "input": chain.sequence, "dssp3": ss8_to_ss3(chain.ss8), "dssp8": chain.ss8,
                     "chain_breaks": str(chain.chain_breaks)})
        if progress is not None:
            progress(name)
    return rows
