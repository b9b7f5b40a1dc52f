"""notebooks/qa.ipynb runs top to bottom headless on a small batch, with reviews injected."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from tests._grade_batch import batch_dir

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "qa.ipynb"


def _kernel_ok() -> None:
    """The python3 kernelspec is ipykernel's native one, which starts this very interpreter."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    if spec.argv[0] not in ("python", "python3", sys.executable):
        pytest.skip(f"python3 kernelspec runs {spec.argv[0]}, not this venv's interpreter")


def test_qa_notebook_runs_and_records_agreement(tmp_path, monkeypatch):
    """Executes every cell; summary, panels and agreement appear; reviews saved; metrics untouched."""
    _kernel_ok()
    import nbformat
    from nbclient import NotebookClient

    out = batch_dir()
    metrics = sorted(out.glob("*/metrics.json"))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in metrics}
    reviews = tmp_path / "reviews_in.csv"
    reviews.write_text("slide_id,stain,reviewer,verdict,mf_grade,cellularity_pct,ecad_pos_per_100_nucleated,comment\n"
                       "p1_ret,reticulin,QA,override,1,,,fewer fibres than measured\n"
                       "p1_he,he,QA,override,,60,,\n"
                       "p1_ecad,ecad,QA,override,,,1.5,\n")
    monkeypatch.setenv("MARROWSEG_QA_DIR", str(out))
    monkeypatch.setenv("MARROWSEG_QA_REVIEWS", str(reviews))
    monkeypatch.delenv("DISPLAY", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    html = "".join(o.get("data", {}).get("text/html", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "p2_broken" in html and "failed:" in html  # failures.csv in the summary
    assert "little tissue" in html
    assert html.count("data:image/png;base64,") >= 6  # overviews, fields, heatmap
    assert "Local fibrosis grades" in html
    assert "weighted kappa" in html and "limits of agreement" in html and "p1_ret" in html
    assert "E-cadherin+ cells per 100 nucleated (measured - pathologist): n = 1" in html
    assert (out / "reviews.csv").exists()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in metrics} == before
    # the committed notebook carries no outputs
    assert not any(c.get("outputs") for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code")
