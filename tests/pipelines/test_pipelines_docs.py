"""The example of docs/steering.md runs as written on the shipped testbed model."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "steering.md"


@pytest.mark.slow  # about 30 s on a 2-core CPU: the testbed model, 2 prompts x 4 particles x 10 steps
@pytest.mark.skipif(not (ROOT / "assets" / "testbed" / "sd" / "model_index.json").exists(),
                    reason="the testbed base model is not shipped in this checkout")
def test_docs_example_runs(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = DOC.read_text()
    code = re.findall(r"```python\n(.*?)```", text[text.index("## From Python"):], re.S)[0]
    threads = torch.get_num_threads()
    try:
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example"})
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "torch.Size([2, 3, 32, 32]) torch.Size([2, 4, 3, 32, 32])"
    assert len(lines) == 2


def test_docs_are_linked_from_the_index():
    assert "(steering.md)" in (ROOT / "docs" / "index.md").read_text()
