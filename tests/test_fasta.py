import gzip
import os

import pytest

from protlm.data import ReadStats, read_fasta, read_sequences
from protlm.errors import InputError
from tests.conftest import DATA


def test_reads_real_uniprot_and_cath_files():
    eco = list(read_fasta(os.path.join(DATA, "ecoli_k12_excerpt.fasta")))
    assert len(eco) == 80 and eco[0].id.startswith("sp|") and "OS=Escherichia coli" in eco[0].description
    gz = list(read_fasta(os.path.join(DATA, "ecoli_k12_excerpt.fasta.gz")))
    assert gz == eco
    cath = list(read_fasta(os.path.join(DATA, "cath_s20_excerpt.fasta")))
    assert len(cath) == 120 and cath[0].id == "cath|4_1_0|107lA00/1-162" and len(cath[0].sequence) == 164  # the segment label is not the length


def test_crlf_lowercase_and_trailing_stop(tmp_path):
    p = tmp_path / "win.fa"
    p.write_bytes(b">a desc\r\nmkt\r\nayi*\r\n\r\n>b\r\nGG\r\n")
    recs = list(read_fasta(p))
    assert [(r.id, r.description, r.sequence) for r in recs] == [("a", "a desc", "MKTAYI"), ("b", "b", "GG")]


def test_no_header(tmp_path):
    p = tmp_path / "x.fa"
    p.write_text("MKTAYI\n")
    with pytest.raises(InputError, match=r"x.fa: line 1: sequence data before the first '>' header"):
        list(read_fasta(p))


def test_empty_record_policy(tmp_path):
    p = tmp_path / "e.fa"
    p.write_text(">a\n>b\nMK\n")
    with pytest.raises(InputError, match=r"e.fa: record 'a' \(line 1\): empty sequence"):
        list(read_fasta(p))
    stats = ReadStats()
    assert [r.id for r in read_fasta(p, policy="skip", stats=stats)] == ["b"]
    assert stats.skipped == 1 and stats.reasons == {"empty": 1}


def test_gaps_stops_and_invalid_characters(tmp_path):
    p = tmp_path / "g.fa"
    p.write_text(">a\nMK-TA\n>b\nMK*TA\n>c\nMK1A\n")
    with pytest.raises(InputError, match=r"record 'a' \(line 1\): gap '-' at residue 3"):
        list(read_fasta(p))
    stats = ReadStats()
    assert [r.sequence for r in read_fasta(p, policy="x", stats=stats)] == ["MKTA", "MKXTA", "MKXA"]
    assert stats.repaired == 3
    stats = ReadStats()
    assert list(read_fasta(p, policy="skip", stats=stats)) == [] and stats.skipped == 3


def test_non_ascii_and_non_utf8(tmp_path):
    p = tmp_path / "u.fa"
    p.write_text(">a\nMKÅA\n", encoding="utf-8")
    with pytest.raises(InputError, match="non-ASCII character 'Å' at residue 3"):
        list(read_fasta(p))
    q = tmp_path / "latin.fa"
    q.write_bytes(b">a\nMK\xe9A\n")
    with pytest.raises(InputError, match="latin.fa: non-UTF-8 bytes"):
        list(read_fasta(q))


def test_truncated_gzip(tmp_path):
    data = gzip.compress(open(os.path.join(DATA, "ecoli_k12_excerpt.fasta"), "rb").read())
    p = tmp_path / "cut.fa.gz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.fa.gz: compressed file is truncated or corrupt"):
        list(read_fasta(p))


def test_empty_file_and_missing_file(tmp_path):
    p = tmp_path / "empty.fa"
    p.write_text("")
    with pytest.raises(InputError, match="no FASTA records"):
        list(read_fasta(p))
    with pytest.raises(InputError, match="no such file"):
        list(read_fasta(tmp_path / "nope.fa"))


def test_csv_input(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("id,sequence\nP1,MKT\nP2,ggA\n")
    assert [(r.id, r.sequence) for r in read_sequences(p)] == [("P1", "MKT"), ("P2", "GGA")]
    p.write_text("id,sequence\nP1,MK1\n")
    with pytest.raises(InputError, match=r"line 2: record 'P1': invalid character '1' at residue 3"):
        list(read_sequences(p))
