"""SAE specs and sweeps: names, validation, the site x width x (λ or k) grid."""

import pytest

from saescope.sites import Site
from saescope.train.spec import SAESpec, sweep

RESID, MLP = Site(0, "resid_post"), Site(1, "mlp_out")


def test_spec_names_validation_and_sweep():
    spec = SAESpec("layer_12/resid_post", d_sae=16384, sparsity_coefficient=1e-3)
    assert spec.name == "layer_12.resid_post.jumprelu.16k.lambda0.001.seed0"
    assert SAESpec.from_dict(spec.to_dict()) == spec
    assert SAESpec(RESID, "topk", 2**20, k=64).name == "layer_0.resid_post.topk.1m.k64.seed0"
    with pytest.raises(ValueError, match="sparsity coefficient"):
        SAESpec(RESID, "jumprelu", 4096)
    with pytest.raises(ValueError, match="needs k"):
        SAESpec(RESID, "topk", 4096)
    specs = sweep([RESID, MLP], [4096, 16384], sparsity_coefficients=[1e-3, 3e-3])
    assert len(specs) == 8 and len({s.name for s in specs}) == 8


def test_sweep_k_per_site_kind():
    specs = sweep([RESID, MLP, Site(2, "mlp_out")], [4096], architecture="batchtopk", ks=[64, 100],
                  kind_ks=["mlp_out=120"])
    assert [(s.site.name, s.k) for s in specs] == [("layer_0/resid_post", 64), ("layer_0/resid_post", 100),
                                                   ("layer_1/mlp_out", 120), ("layer_2/mlp_out", 120)]
    assert [s.k for s in sweep([MLP], [4096], architecture="topk", kind_ks=["mlp_out=7"])] == [7]  # no --k needed
    with pytest.raises(ValueError, match="at least one"):
        sweep([RESID, MLP], [4096], architecture="topk", kind_ks=["mlp_out=7"])
    with pytest.raises(ValueError, match="not jumprelu"):
        sweep([MLP], [4096], sparsity_coefficients=[1e-3], kind_ks=["mlp_out=7"])
    with pytest.raises(ValueError, match="two values"):
        sweep([MLP], [4096], architecture="topk", kind_ks=["mlp_out=7", "mlp_out=8"])
