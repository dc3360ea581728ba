"""One checkpoint of the default run's 54 SAEs (weights and Adam moments, width 2,048) and its
Fisher maps: every file written and hashed, against the later epochs' case where only the 18
``mlp_out`` SAEs moved and the rest is hard-linked from the checkpoint before
(``CheckpointDir.save(versions=...)``), side by side in one temporary folder.

    python benchmarks/checkpoint.py                # 3 rounds
    python benchmarks/checkpoint.py --rounds 5 --dir /path/on/the/disk/to/measure

Prints min / median / max seconds per checkpoint over the rounds."""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saescope.train.checkpoint import CheckpointDir

p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--width", type=int, default=2048)
p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
a = p.parse_args()

g = torch.Generator().manual_seed(0)
tensors, versions = {}, {}
for layer in range(18):
    for kind, d in (("resid_post", 640), ("mlp_out", 640), ("attn_z", 1024)):
        name = f"layer_{layer}.{kind}"
        shapes = {"W_enc": (d, a.width), "W_dec": (a.width, d), "b_enc": (a.width,), "b_dec": (d,)}
        tensors[name] = {f"{prefix}{k}": torch.randn(*s, generator=g)
                         for k, s in shapes.items() for prefix in ("", "adam_m.", "adam_v.")}
        versions[name] = "0"
tensors["input_maps"] = {f"layer_{layer}/{kind}:{m}": torch.randn(d, d, generator=g)
                         for layer in range(18) for kind, d in (("resid_post", 640), ("mlp_out", 640), ("attn_z", 1024))
                         for m in ("matrix", "inverse")}
versions["input_maps"] = "fixed"
size = sum(t.numel() * 4 for named in tensors.values() for t in named.values())
print(f"{len(tensors) - 1} SAEs + maps, {size / 2**30:.2f} GiB per checkpoint")

full, linked = [], []
with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
    ckpt = CheckpointDir(Path(tmp) / "checkpoints")
    step = 0
    for r in range(a.rounds):
        step += 1
        t = time.perf_counter()
        ckpt.save(step, {}, tensors)  # no versions: everything written and hashed
        full.append(time.perf_counter() - t)
        ckpt.save(step + 1000, {}, tensors, versions=versions)  # records the versions
        step += 1
        moved = {n: (str(step) if ".mlp_out" in n else v) for n, v in versions.items()}
        t = time.perf_counter()
        ckpt.save(step + 2000, {}, tensors, versions=moved)  # 18 SAEs written, 36 + maps linked
        linked.append(time.perf_counter() - t)


def fmt(xs):
    return f"{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f} s"


print(f"all written and hashed:            {fmt(full)}")
print(f"mlp_out written, the rest linked:  {fmt(linked)}  ({statistics.median(full) / statistics.median(linked):.1f}x)")
