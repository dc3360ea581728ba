"""Input maps compared on one stored site: BatchTopK → JumpReLU SAEs trained behind fixed linear
maps x_n = (x − mean)·G^½ (loss eᵀ·G·e), folded to raw units, evaluated with the SAE spliced in.

Maps: ``diag`` (the σ^−½ diagonal map), ``fisher`` (the site's Fisher metric, plus the 1% ridge),
``mixW`` (W·Fisher + (1 − W)·diag: the "fisher" input map with fisher_weight W), ``fdmixW`` (the
same with the Fisher's diagonal only), ``scalarc`` (centred scalar).  Options per variant after
``@``: ``k=``, ``w=`` (width), ``ep=`` (epochs), ``bs=``, ``lr=``, ``tok=`` (training tokens),
``dec=`` (the cosine lr decay's fraction of the run; the CPU presets use 0.2).
The Fisher metrics come from a file written by ``--write-fisher`` (saescope.activations.fisher).
Prints one row per variant; never a timed test.  Example (docs/fidelity.md's table)::

    python benchmarks/fisher_map.py --store STORE --site layer_13/mlp_out --write-fisher F.pt
    python benchmarks/fisher_map.py --store STORE --site layer_13/mlp_out --fisher F.pt \
        --variants "diag,mix0.5,mix0.5@ep=4,mix0.5@k=150"
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saescope.activations.store import ActivationStore
from saescope.sites import Site
from saescope.sae.registry import build_sae
from saescope.sae.topk import TopKConfig
from saescope.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from saescope.train.recipe import Recipe
from saescope.train.sae_trainer import SAETrainer
p=argparse.ArgumentParser()
p.add_argument("--store"); p.add_argument("--site"); p.add_argument("--variants",default="diag,fisher,mix0.5")
p.add_argument("--tokens",type=int,default=98304); p.add_argument("--k",type=int,default=100)
p.add_argument("--width",type=int,default=2048); p.add_argument("--batch",type=int,default=1024)
p.add_argument("--lr",type=float,default=2e-3); p.add_argument("--fisher",help="Fisher metrics file (torch.save of {site: F})")
p.add_argument("--write-fisher",help="compute the site's Fisher metric on 4,096 training tokens, save it here, and use it")
p.add_argument("--loss-tokens",type=int,default=8192); p.add_argument("--ridge",type=float,default=0.01)
p.add_argument("--epochs",type=int,default=1)
a=p.parse_args()
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2))); torch.manual_seed(0)
site=Site.parse(a.site)
st=ActivationStore(a.store)
X=torch.cat([st.read(site,i) for i in range(math.ceil(a.tokens/32768))])[:a.tokens]
print("rows",len(X))
X=X[torch.randperm(len(X),generator=torch.Generator().manual_seed(0))]
mu=X.mean(0); Xc=X-mu; Sigma=(Xc.T.double()@Xc.double())/len(X)
var=Sigma.diagonal()
if a.write_fisher:
    from saescope.activations.fisher import site_fisher
    from saescope.models import load_model
    from saescope.tokens import load_corpus
    _model, _tok = load_model("gemma-3-270m")
    _corpus = load_corpus("wiki-vital", _tok, seq_len=256, max_tokens=8192, split="train", seed=7)
    _F, _ = site_fisher(_model, _corpus, [site], n_tokens=4096)
    torch.save({a.site: _F[site]}, a.write_fisher)
    a.fisher = a.write_fisher
Fd=torch.load(a.fisher); Fm=Fd[a.site].double()
def normalise(G): return G/ (G*Sigma).sum()   # tr(GΣ)=1 -> E‖x_n‖²=1
def sqrtm(G):
    w,V=torch.linalg.eigh(G); w=w.clamp_min(w.max()*1e-10); return (V*w.sqrt())@V.T, (V/w.sqrt())@V.T
Gd=normalise(torch.diag(var.clamp_min(var.mean()*1e-6)**-0.5))
Gf=Fm+a.ridge*torch.trace(Fm)/len(Fm)*torch.eye(len(Fm),dtype=torch.float64)
Gf=normalise(Gf)
def G_of(v):
    if v=="diag": return Gd
    if v=="fisher": return Gf
    if v.startswith("mix"): t=float(v[3:]); return normalise(t*Gf+(1-t)*Gd)
    if v.startswith("fdmix"): t=float(v[5:]); return normalise(t*torch.diag(Gf.diagonal())+(1-t)*Gd)
    if v=="scalarc": return normalise(torch.eye(len(var),dtype=torch.float64))
    if v.startswith("fdiag"): return normalise(torch.diag(Fm.diagonal())+a.ridge*torch.trace(Fm)/len(Fm)*torch.eye(len(Fm),dtype=torch.float64))
    raise ValueError(v)
n_steps=a.tokens//a.batch*a.epochs
saes={}
rows={}
for vfull in a.variants.split(","):
    v,_,opts=vfull.partition("@")
    o=dict(kv.split("=") for kv in opts.split(";")) if opts else {}
    k=int(o.get("k",a.k)); width=int(o.get("w",a.width)); ep=int(o.get("ep",a.epochs)); bs=int(o.get("bs",a.batch)); lr=float(o.get("lr",a.lr))
    dec=float(o.get("dec",0.0))
    ntr=int(o.get("tok",a.tokens)); n_steps=ntr//bs*ep
    G=G_of(v); M,Minv=sqrtm(G); M=M.float(); Minv=Minv.float()
    torch.manual_seed(0)
    sae=build_sae(TopKConfig(architecture="batchtopk",d_in=X.shape[1],d_sae=width,k=k,centre_input=True))
    rec=Recipe.for_steps(n_steps,lr=lr,batch_size=bs,dtype="bfloat16",lr_decay_fraction=dec)
    tr=SAETrainer(sae,rec,sparsity_coefficient=0.0,n_steps=n_steps)
    t0=time.time()
    for s in range(n_steps):
        i=(s*bs)%ntr
        xb=(X[i:i+bs]-mu)@M
        tr.update(s,xb,return_metrics=False)
    sec=time.time()-t0
    # fold: pre = x M W + [b_enc - (mu M + b_dec) W];  x̂ = f W_dec M⁻¹ + b_dec M⁻¹ + mu
    with torch.no_grad():
        We=M@sae.W_enc; be=sae.b_enc-(mu@M+sae.b_dec)@sae.W_enc
        Wd=sae.W_dec@Minv; bd=sae.b_dec@Minv+mu; th=sae.threshold.clone()
        n=Wd.norm(dim=1).clamp_min(1e-30)
        out=JumpReLUSAE(JumpReLUConfig(X.shape[1],width,centre_input=False))
        out.load_arrays({"W_enc":We*n,"b_enc":be*n,"W_dec":Wd/n[:,None],"b_dec":bd,"threshold":th*n})
    saes[vfull]=(site,out.eval()); rows[vfull]=sec
    print(f"{vfull}: trained {n_steps} steps in {sec:.0f}s, released L0 {tr.released_l0}",flush=True)
from saescope.evaluate.suite import EvalConfig, evaluate
from saescope.models import load_model
from saescope.tokens import load_corpus
model,tok=load_model("gemma-3-270m")
corpus=load_corpus("wiki-vital",tok,seq_len=256,max_tokens=a.loss_tokens+4096,split="heldout",seed=0)
r=evaluate(model,corpus,saes,EvalConfig(loss_tokens=a.loss_tokens,dtype="bfloat16",progress=False))
z=r['sites'][a.site]['delta_loss_zero_ablation']
print(f"\n{a.site} tokens {a.tokens} x{a.epochs} k {a.k}: zero abl +{z:.3f}, {r['info']['n_loss_tokens']} loss tokens")
for v in saes:
    m=r['saes'][v]
    print(f"{v:<28} sec {rows[v]:5.0f} L0 {m['l0']:6.1f} FVU {m['fvu']:.4f} fvu_std {m['fvu_std']:.3f} dl {m['delta_loss']:.4f} CE {m['ce_loss_score']:.3f} KL {m['kl_div']:.4f} dead {m['frac_dead']:.3f}",flush=True)
