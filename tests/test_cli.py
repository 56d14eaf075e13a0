import subprocess
import sys

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
