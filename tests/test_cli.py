import subprocess
import sys

import pytest

from protlm.cli.main import main


def test_info_on_preset(capsys):
    assert main(["info", "debug"]) == 0
    out = capsys.readouterr().out
    assert "family        ankh3" in out and "225 sentinels" in out


def test_errors_are_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "protlm.cli.main", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "no such checkpoint directory" in proc.stderr


def test_embed_input_may_follow_options(tmp_path, capsys):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n>b\nGSHMLE\n")
    out = tmp_path / "p.h5"
    assert main(["embed", "debug", "--random-init", str(fasta), "--per-protein", str(out), "--no-progress"]) == 0
    import h5py

    with h5py.File(out) as fh:
        assert sorted(fh[k].attrs["original_id"] for k in fh) == ["a", "b"]
    with pytest.raises(SystemExit) as stop:
        main(["embed", "debug", "--random-init", str(fasta), "surplus.fasta"])
    assert stop.value.code == 2
    assert "unrecognized arguments: surplus.fasta" in capsys.readouterr().err
