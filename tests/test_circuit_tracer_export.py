"""saescope export --format circuit-tracer: a release's transcoders as circuit-tracer's transcoder
set, checked against the format read from circuit-tracer 0.5's loader and loaded by that loader
itself in its own environment ($SAESCOPE_PEERS/circuit-tracer, built by scripts/peer-envs.sh)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from saescope.release.export import export_circuit_tracer
from saescope.release.save import save_sae
from saescope.sae.base import SAEConfig
from saescope.sae.registry import build_sae

CT_PYTHON = Path(os.environ.get("SAESCOPE_PEERS", "/work/peers")) / "circuit-tracer" / "bin" / "python"
D_IN, D_OUT, D_SAE, LAYERS = 12, 12, 64, 3


def transcoder(arch: str, seed: int):
    torch.manual_seed(seed)
    tc = build_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, architecture=arch))
    with torch.no_grad():
        tc.threshold.uniform_(0.05, 0.3)
        tc.b_enc.normal_(0, 0.2)
        tc.b_dec.normal_(0, 0.2)
        if "W_skip" in tc.array_names:
            tc.W_skip.normal_(0, 0.3)
    return tc.eval()


def make_release(root: Path, arch: str, layers=range(LAYERS), extra_l0=None) -> dict[int, torch.nn.Module]:
    saes = {}
    for layer in layers:
        tc = transcoder(arch, seed=layer)
        folder = save_sae(tc, root / f"transcoder/layer_{layer}/width_64/average_l0_20",
                          config={"site": f"layer_{layer}/transcoder", "model": "tiny-model"},
                          metrics={"average_l0": 20.0})
        saes[layer] = tc
        if extra_l0 is not None:  # a second transcoder at this layer, further from the wanted L0
            save_sae(transcoder(arch, seed=100 + layer), root / f"transcoder/layer_{layer}/width_64/average_l0_{extra_l0}",
                     config={"site": f"layer_{layer}/transcoder", "model": "tiny-model"},
                     metrics={"average_l0": float(extra_l0)})
        assert folder.is_dir()
    return saes


def circuit_tracer_forward(tensors: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """circuit-tracer's SingleLayerTranscoder maths on its own tensor names and orientations:
    F.linear(x, W_enc, b_enc), JumpReLU x·1[x > θ], acts @ W_dec + b_dec (+ x @ W_skip.T)."""
    pre = x @ tensors["W_enc"].T + tensors["b_enc"]
    acts = pre * (pre > tensors["activation_function.threshold"])
    y = acts @ tensors["W_dec"] + tensors["b_dec"]
    if "W_skip" in tensors:
        y = y + x @ tensors["W_skip"].T
    return acts, y


@pytest.mark.parametrize("arch", ["jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_layout_keys_shapes_orientation_and_predictions(tmp_path, arch):
    saes = make_release(tmp_path / "release", arch)
    out = export_circuit_tracer(tmp_path / "release", tmp_path / "ct")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["model_name"] == "tiny-model"
    assert config["feature_input_hook"] == "mlp.hook_in" and config["feature_output_hook"] == "hook_mlp_out"
    assert sorted(p.name for p in out.glob("layer_*.safetensors")) == [f"layer_{i}.safetensors" for i in range(LAYERS)]
    x = np.random.default_rng(0).normal(size=(16, D_IN)).astype(np.float32)
    for layer, tc in saes.items():
        tensors = load_file(out / f"layer_{layer}.safetensors")
        expected = {"W_enc": (D_SAE, D_IN), "W_dec": (D_SAE, D_OUT), "b_enc": (D_SAE,), "b_dec": (D_OUT,),
                    "activation_function.threshold": (D_SAE,)}
        if arch.endswith("skip_transcoder"):
            expected["W_skip"] = (D_OUT, D_IN)
        assert {k: v.shape for k, v in tensors.items()} == expected
        acts, y = circuit_tracer_forward(tensors, x)
        with torch.no_grad():
            np.testing.assert_allclose(acts, tc.encode(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(y, tc(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_one_transcoder_per_layer_is_chosen_and_gaps_are_refused(tmp_path):
    make_release(tmp_path / "r", "jumprelu_transcoder", extra_l0=90)
    out = export_circuit_tracer(tmp_path / "r", tmp_path / "ct20", target_l0=25)
    layers = yaml.safe_load((out / "config.yaml").read_text())["saescope"]["layers"]
    assert all(v["sae"].endswith("average_l0_20") for v in layers.values())
    out = export_circuit_tracer(tmp_path / "r", tmp_path / "ct90", target_l0=80)
    layers = yaml.safe_load((out / "config.yaml").read_text())["saescope"]["layers"]
    assert all(v["sae"].endswith("average_l0_90") for v in layers.values())

    make_release(tmp_path / "gap", "jumprelu_transcoder", layers=(0, 2))
    with pytest.raises(ValueError, match=r"every layer from 0.*layer\(s\) 1"):
        export_circuit_tracer(tmp_path / "gap", tmp_path / "x")
    sae = build_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="jumprelu"))
    sae.fold_input_scale(1.0)
    save_sae(sae, tmp_path / "saes/resid_post/layer_0/width_64/average_l0_3", config={"site": "layer_0/resid_post"})
    with pytest.raises(ValueError, match="no transcoder"):
        export_circuit_tracer(tmp_path / "saes", tmp_path / "y")


_CT_SCRIPT = r"""
import json, sys
import numpy as np, torch
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
out, inputs, result = sys.argv[1:]
transcoders, config = load_transcoder_from_hub(out, dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
x = torch.from_numpy(np.load(inputs))
arrays = {}
with torch.no_grad():
    for layer in range(len(transcoders)):
        tc = transcoders[layer]
        arrays[f"acts_{layer}"] = tc.encode(x).numpy()
        arrays[f"y_{layer}"] = tc(x).numpy()
np.savez(result, **arrays)
print(json.dumps({"n": len(transcoders), "skip": transcoders.skip_connection, "model_name": config["model_name"],
                  "in": transcoders.feature_input_hook, "out": transcoders.feature_output_hook}))
"""


@pytest.mark.parametrize("arch", ["jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_circuit_tracer_loads_the_export_and_agrees(tmp_path, arch):
    if not CT_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"no circuit-tracer environment at {CT_PYTHON}: .ci/run builds it (scripts/peer-envs.sh circuit-tracer)")
        pytest.skip(f"no circuit-tracer environment at {CT_PYTHON} (bash scripts/peer-envs.sh circuit-tracer builds it)")
    saes = make_release(tmp_path / "release", arch)
    out = export_circuit_tracer(tmp_path / "release", tmp_path / "ct")
    x = np.random.default_rng(1).normal(size=(24, D_IN)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", CIRCUIT_TRACER_CACHE_DIR=str(tmp_path / "ct-cache"))
    proc = subprocess.run([str(CT_PYTHON), "-c", _CT_SCRIPT, str(out.resolve()), str(tmp_path / "x.npy"),
                           str(tmp_path / "result.npz")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"n": LAYERS, "skip": arch.endswith("skip_transcoder"), "model_name": "tiny-model",
                    "in": "mlp.hook_in", "out": "hook_mlp_out"}
    result = np.load(tmp_path / "result.npz")
    for layer, tc in saes.items():
        with torch.no_grad():
            f = tc.encode(torch.from_numpy(x)).numpy()
            y = tc(torch.from_numpy(x)).numpy()
        assert (f > 0).any()
        np.testing.assert_allclose(result[f"acts_{layer}"], f, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result[f"y_{layer}"], y, rtol=1e-5, atol=1e-5)
