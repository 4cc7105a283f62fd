"""notebooks/sample_demo.ipynb executes top to bottom (nbclient) on a tiny BinaryDM workdir. ~30 s."""

import base64
import io
import os

import nbformat
from nbclient import NotebookClient
from PIL import Image

from export_fixtures import student_workdir, tiny_config

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def test_sample_demo_notebook_executes(tmp_path, monkeypatch):
    workdir = str(tmp_path / "tiny")
    student_workdir(workdir, tiny_config())  # tiny config, method=binarydm, progressive schedule finished
    monkeypatch.setenv("BDM_WORKDIR", workdir)
    monkeypatch.setenv("BDM_NUM", "4")
    monkeypatch.setenv("BDM_STEPS", "3")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(os.path.join(NOTEBOOKS, "sample_demo.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{workdir}/packed: step 2" in text and "BinaryDM W1A4" in text  # export summary, size table
    assert "this checkpoint = BinaryDM W1.1A32" in text
    pngs = [o.data["image/png"] for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pngs) == 1
    grid = Image.open(io.BytesIO(base64.b64decode(pngs[0])))
    assert grid.size == (4 * 19, 4 * 19)  # 2x2 grid of 8x8 digits with 1-px padding, shown 4x
    assert os.path.isfile(os.path.join(workdir, "packed", "manifest.json"))
    assert [f for f in os.listdir(os.path.join(workdir, "samples")) if f.endswith(".png")]
