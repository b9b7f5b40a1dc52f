"""scripts/eval_reticulin.py: per-cell sums saved by --save-windows grade again as the analyzer did."""

from __future__ import annotations

import re

from tests._scripts import load_script


def _script():
    return load_script("eval_reticulin")


def test_regrade_of_saved_windows_reproduces_the_analyzer_grade(tmp_path, capsys):
    ev = _script()
    ev.main(["--seeds", "1", "--size", "512", "--mpp", "0.5", "--heterogeneous", "half-0-2",
             "--save-windows", str(tmp_path)])
    first = capsys.readouterr().out
    row = next(line for line in first.splitlines() if line.strip().startswith("1 half-0-2"))
    g_true, g_meas = (int(v) for v in row.split()[11:13])
    assert (tmp_path / "1_half-0-2.npz").exists()

    ev.main(["--regrade", str(tmp_path)])
    out = capsys.readouterr().out
    m = re.search(r"truth MF-(\d).*-> MF-(\d)", out)
    assert m and (int(m.group(1)), int(m.group(2))) == (g_true, g_meas)
    assert "grade recovered" in out

    # an override reaches the grading: one-cell windows (50 µm) give another map
    ev.main(["--regrade", str(tmp_path), "--set", "reticulin.grade_window_um=50"])
    small = capsys.readouterr().out
    shares = [re.search(r"map (\S+)", o).group(1) for o in (out, small)]
    assert shares[0] != shares[1]
