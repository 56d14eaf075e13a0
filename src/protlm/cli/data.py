"""``protlm data``: derive benchmark files from public sources.

    protlm data casp14-ssp PDB_DIR -o CASP14_ssp.csv

``casp14-ssp`` runs DSSP (``mkdssp``, Debian package ``dssp``) on every PDB file of a directory and writes the
table the SSP tasks read: ``id,input,dssp3,dssp8,chain_breaks``, one row per structure, observed residues only
(DSSP's chain-break markers are dropped and counted). dssp8 keeps DSSP's own letters (H G I E B T S P, coil as
C); dssp3 is H (G, H, I), E (E, B), C (the rest).
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="derive benchmark files (CASP14 secondary structure from PDB files)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="data_command", metavar="WHAT")
    c = dsub.add_parser("casp14-ssp", help="secondary-structure CSV from PDB files with DSSP")
    c.add_argument("pdb_dir", help="directory of .pdb / .pdb.gz files (e.g. the 18 CASP14 target structures)")
    c.add_argument("-o", "--output", required=True, help="CSV to write (.csv or .csv.gz)")
    c.add_argument("--mkdssp", help="path of the mkdssp program (default: mkdssp on PATH, or $PROTLM_MKDSSP)")
    c.set_defaults(run=_casp14_ssp)
    p.set_defaults(run=lambda args: (p.print_help(), 2)[1])


def _casp14_ssp(args: argparse.Namespace) -> int:
    import csv
    import glob
    import gzip
    import io
    import os

    from protlm.errors import InputError
    from protlm.evaluate.structure import derive_ssp_table, find_mkdssp
    from protlm.utils import atomic_path

    if not os.path.isdir(args.pdb_dir):
        raise InputError(f"{args.pdb_dir}: not a directory of PDB files")
    paths = sorted(p for pat in ("*.pdb", "*.pdb.gz", "*.ent", "*.ent.gz") for p in glob.glob(os.path.join(args.pdb_dir, pat)))
    if not paths:
        raise InputError(f"{args.pdb_dir}: no .pdb / .pdb.gz files")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise InputError(f"{args.output}: directory {out_dir} does not exist")
    exe = find_mkdssp(args.mkdssp)
    rows = derive_ssp_table(paths, exe, progress=lambda name: print(f"  {name}"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["id", "input", "dssp3", "dssp8", "chain_breaks"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(args.output) as tmp:
        data = buf.getvalue().encode()
        if args.output.endswith(".gz"):
            with gzip.open(tmp, "wb", compresslevel=9) as fh:
                fh.write(data)
        else:
            with open(tmp, "wb") as fh:
                fh.write(data)
    n = sum(len(r["input"]) for r in rows)
    print(f"wrote {args.output}: {len(rows)} structures, {n:,} residues ({exe})")
    return 0
