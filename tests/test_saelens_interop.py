"""SAELens's format both ways: export → SAELens's own loader (in its own environment) gives the same
encode/decode as saescope; SAELens folders load back through saescope.load_sae."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import saescope
from saescope.cli import main
from saescope.release.export import export_saelens
from saescope.release.saelens import WEIGHTS, hook_name, read_saelens, site_of_hook
from saescope.release.save import save_sae
from saescope.sae.base import SAEConfig
from saescope.sae.registry import build_sae
from saescope.sites import Site

#: the SAELens environment scripts/peer-envs.sh builds (sae-lens 6.54.12, torch 2.13.0 CPU)
SAELENS_PYTHON = Path(os.environ.get("SAESCOPE_PEERS", "/work/peers")) / "saelens" / "bin" / "python"

CASES = [  # (architecture, site, d_in)
    ("jumprelu", Site(3, "resid_post"), 16),
    ("topk", Site(1, "mlp_out"), 16),
    ("relu", Site(2, "attn_z"), 24),
    ("batchtopk", Site(0, "resid_post"), 16),
    ("jumprelu_transcoder", Site(2, "transcoder"), 16),
    ("jumprelu_skip_transcoder", Site(4, "transcoder"), 16),
]
D_OUT = 12  # transcoders predict a site of another width than they read


def make_release(root: Path) -> dict[str, tuple[Site, torch.nn.Module]]:
    """One release-form SAE per architecture with random (non-trivial) weights, saved by saescope."""
    saes = {}
    for i, (arch, site, d_in) in enumerate(CASES):
        g = torch.Generator().manual_seed(i)
        transcoder = site.kind == "transcoder"
        sae = build_sae(SAEConfig(d_in=d_in, d_sae=40, architecture=arch, centre_input=False,
                                  **({"k": 6} if arch in ("topk", "batchtopk") else {}),
                                  **({"d_out": D_OUT} if transcoder else {})))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(d_in, 40, generator=g) / d_in**0.5)
            sae.b_enc.copy_(torch.randn(40, generator=g) * 0.1)
            sae.b_dec.copy_(torch.randn(D_OUT if transcoder else d_in, generator=g))
            if hasattr(sae, "W_skip"):
                sae.W_skip.copy_(torch.randn(d_in, D_OUT, generator=g) * 0.3)
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand(40, generator=g) * 0.3 + 0.01)
        folder = root / site.kind / f"layer_{site.layer}" / "width_40" / f"average_l0_{i + 5}"
        save_sae(sae, folder, config={"model": "tiny", "site": site.name, "corpus": "tiny.jsonl", "seq_len": 32})
        saes[str(folder.relative_to(root))] = (site, sae)
    return saes


def test_hook_names_round_trip():
    for site in (Site(0, "resid_post"), Site(17, "mlp_out"), Site(6, "attn_z")):
        assert site_of_hook(hook_name(site)) == site
    assert hook_name(Site(6, "attn_z")) == "blocks.6.attn.hook_z"
    with pytest.raises(ValueError, match="not a site"):
        site_of_hook("blocks.3.hook_resid_pre")


def test_export_then_load_sae_reads_it_back_exactly(tmp_path):
    saes = make_release(tmp_path / "release")
    assert main(["export", "--format", "saelens", str(tmp_path / "release"), str(tmp_path / "out")]) == 0
    x = torch.randn(30, 24)
    for relative, (site, sae) in saes.items():
        folder = tmp_path / "out" / relative
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == hook_name(site)
        assert cfg["reshape_activations"] == ("hook_z" if site.kind == "attn_z" else "none")
        assert cfg["apply_b_dec_to_input"] is False and cfg["metadata"]["saescope"]["site"] == site.name
        back = saescope.load_sae(folder)
        xs = x[:, : sae.cfg.d_in]
        with torch.no_grad():
            torch.testing.assert_close(back.encode(xs), sae.encode(xs), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(back(xs), sae(xs), atol=1e-6, rtol=1e-6)
    (released,) = [r for r in saescope.load_release(tmp_path / "out") if r.site == Site(1, "mlp_out")]
    assert released.config["source"] == "saelens"


def test_a_saelens_folder_that_subtracts_b_dec_is_folded_exactly(tmp_path):
    """SAELens's own training default (apply_b_dec_to_input=True) loads as release form."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    W_enc, W_dec = torch.randn(8, 20, generator=g), torch.randn(20, 8, generator=g)
    b_enc, b_dec = torch.randn(20, generator=g), torch.randn(8, generator=g)
    folder = tmp_path / "sl"
    folder.mkdir()
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}, str(folder / WEIGHTS))
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 8, "d_sae": 20,
                                                 "apply_b_dec_to_input": True, "normalize_activations": "none",
                                                 "metadata": {"hook_name": "blocks.2.hook_resid_post"}}))
    sae, config = read_saelens(folder)
    x = torch.randn(10, 8, generator=g)
    expected = ((x - b_dec) @ W_enc + b_enc).relu()
    torch.testing.assert_close(sae.encode(x), expected, atol=1e-5, rtol=1e-5)
    assert config["site"] == "layer_2/resid_post" and sae.architecture == "relu"
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(ValueError, match="normalize_activations"):
        read_saelens(folder)


_SAELENS_SIDE = r"""
import json, sys
import numpy as np, torch
from sae_lens import SAE
out = {}
for folder, x_file, heads in json.loads(sys.argv[1]):
    sae = SAE.load_from_disk(folder)
    x = torch.from_numpy(np.load(x_file))
    if heads:  # hook_z arrives as (..., heads, d_head), as TransformerLens gives it
        x = x.reshape(x.shape[0], heads, -1)
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f).reshape(x.shape[0], -1)
        y = sae(x).reshape(x.shape[0], -1)  # transcoders: forward adds the skip path, decode does not
        out[folder] = {"arch": sae.cfg.architecture(), "f": f.tolist(), "x_hat": x_hat.tolist(), "y": y.tolist(),
                       "hook": sae.cfg.metadata.hook_name}
print(json.dumps(out))
"""


def test_saelens_loads_the_export_and_agrees(tmp_path):
    """The real SAELens (its own environment, in a subprocess): load_from_disk on every exported
    folder, then encode/decode equal to saescope's within 1e-5 (relative)."""
    if not SAELENS_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SAELENS_PYTHON} is missing: .ci/run builds it with scripts/peer-envs.sh saelens")
        pytest.skip(f"no SAELens environment at {SAELENS_PYTHON} (bash scripts/peer-envs.sh saelens builds it)")
    saes = make_release(tmp_path / "release")
    export_saelens(tmp_path / "release", tmp_path / "out")
    jobs, expected = [], {}
    for relative, (site, sae) in saes.items():
        folder = str(tmp_path / "out" / relative)
        x = np.random.default_rng(0).normal(size=(25, sae.cfg.d_in)).astype(np.float32) * 2
        np.save(tmp_path / f"x{len(jobs)}.npy", x)
        jobs.append((folder, str(tmp_path / f"x{len(jobs)}.npy"), 4 if site.kind == "attn_z" else 0))
        with torch.no_grad():
            f = sae.encode(torch.from_numpy(x))
            expected[folder] = (site, sae.architecture, f.numpy(), sae.decode(f).numpy(), sae(torch.from_numpy(x)).numpy())
    result = subprocess.run([str(SAELENS_PYTHON), "-c", _SAELENS_SIDE, json.dumps(jobs)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for folder, (site, arch, f, x_hat, y) in expected.items():
        g = got[folder]
        assert g["arch"] == {"jumprelu": "jumprelu", "batchtopk": "jumprelu", "topk": "topk", "relu": "standard",
                             "jumprelu_transcoder": "jumprelu_transcoder",
                             "jumprelu_skip_transcoder": "jumprelu_skip_transcoder"}[arch]
        assert g["hook"] == hook_name(site)
        assert (f > 0).sum() > 0
        for ours, theirs in ((f, g["f"]), (x_hat, g["x_hat"]), (y, g["y"])):
            theirs = np.asarray(theirs, dtype=np.float32)
            assert np.abs(theirs - ours).max() <= 1e-5 * max(1.0, np.abs(ours).max()), folder
