"""docs/tutorial.md runs top to bottom (its ```python blocks, in order, in one namespace)."""

import os
import re
from pathlib import Path

import pytest

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_tutorial_has_code():
    blocks = python_blocks(TUTORIAL.read_text())
    assert len(blocks) >= 6  # train, load, features, top tokens, splice, steer


@pytest.mark.slow
def test_tutorial_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(python_blocks(TUTORIAL.read_text())):
        exec(compile(block, f"{TUTORIAL.name}[block {i}]", "exec"), namespace)
    # the objects the tutorial promises exist and are real
    assert Path(namespace["folder"], "params.npz").exists()
    # The SAE (a minute of training) must still carry information: splicing it in beats
    # zero-ablating the site on the same tokens.
    import torch

    from saescope.sites import hooked

    model, site, ids = namespace["model"], namespace["site"], namespace["ids"]
    with torch.no_grad(), hooked(model, {site: torch.zeros_like}):
        zero_ablated = namespace["cross_entropy"](model(ids).logits)
    assert namespace["clean"] < namespace["spliced"] < zero_ablated
    assert namespace["best"], "no activating context found"
    assert os.path.isdir(tmp_path / "runs" / "tutorial")
