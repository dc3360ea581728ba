"""Every user or environment error through the real CLI (``python3 -m saescope`` in a subprocess)
ends in one line ``saescope <cmd>: error: ...`` naming the problem, exit code 1 (argparse's usage
errors: 2; Ctrl-C: 130), and no traceback; a genuine bug keeps its traceback and asks for a report.

The cases share one tiny world, built once: a word-level model folder, a .jsonl corpus, a
harvested store and a trained release.  Faults the machine cannot be made to produce on demand
(a full disk, a read-only disk, a permission refused, Ctrl-C, a bug) are injected by patching
the standard library in the child before the CLI starts; the CLI itself runs unchanged.  Every
subprocess runs concurrently in one fixture, so the file costs about one CPU-bound minute.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from saescope.release.layout import CHECKSUMS
from saescope.release.save import write_checksums

ROOT = Path(__file__).resolve().parents[1]

#: code run in the child before the CLI: each makes one fault happen where the CLI writes
FAULTS = {
    "enospc": "import errno, os\n"
              "def replace(src, dst, _real=os.replace):\n"
              "    if 'checkpoints' in str(dst) or 'release' in str(dst):\n"
              "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))\n"
              "    return _real(src, dst)\n"
              "os.replace = replace\n",
    "erofs": "import errno, os, pathlib\n"
             "def mkdir(self, *a, _real=pathlib.Path.mkdir, **k):\n"
             "    if 'ro_out' in str(self):\n"
             "        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))\n"
             "    return _real(self, *a, **k)\n"
             "pathlib.Path.mkdir = mkdir\n",
    "eacces": "import errno, os, pathlib\n"
              "def write_bytes(self, data, _real=pathlib.Path.write_bytes):\n"
              "    if 'locked_out' in str(self):\n"
              "        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))\n"
              "    return _real(self, data)\n"
              "pathlib.Path.write_bytes = write_bytes\n",
    "ctrl_c": "import saescope.models\n"
              "def load_model(*a, **k):\n"
              "    raise KeyboardInterrupt\n"
              "saescope.models.load_model = load_model\n",
    "bug": "import saescope.models\n"
           "def load_model(*a, **k):\n"
           "    return {}['no such key']\n"
           "saescope.models.load_model = load_model\n",
}

H = "harvest --model {model} --corpus {corpus} --seq-len 32 --tokens 200 --device cpu --no-progress"
T = "train --store {store} --widths 32 --batch-size 256 --device cpu --no-progress"
E = "eval --release {release} --corpus {corpus} --seq-len 32 --tokens 200 --device cpu --no-progress"
F = "features --release {release} --corpus {corpus} --seq-len 32 --tokens 200 --device cpu --no-progress"

#: (category, case id, command line, expected exit code, a fragment the message must hold, fault)
CASES = [
    # --- usage: argparse refuses, exit 2, no torch imported ---------------------------------
    ("usage", "no command", "", 2, "usage: saescope", None),
    ("usage", "unknown command", "frobnicate", 2, "invalid choice: 'frobnicate'", None),
    ("usage", "train --batch-size 0", "train --batch-size 0", 2, "--batch-size: must be >= 1", None),
    ("usage", "train --batch-size -4", "train --batch-size -4", 2, "--batch-size: must be >= 1", None),
    ("usage", "train --tokens inf", "train --tokens inf", 2, "--tokens: not a whole number: 'inf'", None),
    ("usage", "train --tokens nan", "train --tokens nan", 2, "--tokens: not a whole number: 'nan'", None),
    ("usage", "train --tokens -5", "train --tokens -5", 2, "--tokens: must be >= 1", None),
    ("usage", "train --tokens 1.5", "train --tokens 1.5", 2, "--tokens: not a whole number", None),
    ("usage", "train --lr nan", "train --lr nan", 2, "--lr: not a finite number", None),
    ("usage", "train --lr inf", "train --lr inf", 2, "--lr: not a finite number", None),
    ("usage", "train --lr -1", "train --lr -1", 2, "--lr: must be >=", None),
    ("usage", "train --lr abc", "train --lr abc", 2, "--lr: not a number: 'abc'", None),
    ("usage", "train --widths 4k,lots", "train --widths 4k,lots", 2, "--widths", None),
    ("usage", "run --kind-k attn=80", "run --kind-k attn=80", 2, "--kind-k: in 'attn=80': expected kind=N", None),
    ("usage", "run --kind-k attn_z=0", "run --kind-k attn_z=0", 2, "--kind-k: in 'attn_z=0': must be >= 1", None),
    ("usage", "train --kind-epochs mlp_out=0", "train --kind-epochs mlp_out=0", 2,
     "--kind-epochs: in 'mlp_out=0': must be >= 1", None),
    ("usage", "train --widths 0", "train --widths 0", 2, "--widths: in '0': must be >= 1", None),
    ("usage", "train --seq-len 1", "train --seq-len 1", 2, "--seq-len: must be >= 2", None),
    ("usage", "train --checkpoint-every 0", "train --checkpoint-every 0", 2, "--checkpoint-every: must be >= 1", None),
    ("usage", "train --lr-decay-fraction 2", "train --lr-decay-fraction 2", 2, "--lr-decay-fraction: must be in", None),
    ("usage", "train --adam-beta1 1", "train --adam-beta1 1", 2, "--adam-beta1: must be in [0, 1)", None),
    ("usage", "train --l0-coefficients nan", "train --l0-coefficients 1e-3,nan", 2, "--l0-coefficients", None),
    ("usage", "train --k 0", "train --arch topk --k 0", 2, "--k: in '0': must be >= 1", None),
    ("usage", "train --seed -1", "train --seed -1", 2, "--seed: must be >= 0", None),
    ("usage", "train --target-l0 -5", "train --target-l0 20,-5", 2, "--target-l0: in '20,-5': must be > 0", None),
    ("usage", "train --target-l0 0", "train --target-l0 0", 2, "--target-l0: in '0': must be > 0", None),
    ("usage", "train --max-frequency 1.5", "train --max-frequency 1.5", 2,
     "--max-frequency: must lie strictly between 0 and 1", None),
    ("usage", "train --prefixes 0", "train --prefixes 0", 2, "--prefixes: in '0': must be >= 1", None),
    ("usage", "train --threshold-init nope", "train --threshold-init nope", 2, "--threshold-init: invalid choice",
     None),
    ("usage", "train --dtype float16", "train --dtype float16", 2, "--dtype: invalid choice", None),
    ("usage", "harvest without --out", "harvest", 2, "the following arguments are required: --out", None),
    ("usage", "harvest --tokens 0", "harvest --out x --tokens 0", 2, "--tokens: must be >= 1", None),
    ("usage", "harvest --batch-seqs 0", "harvest --out x --batch-seqs 0", 2, "--batch-seqs", None),
    ("usage", "harvest --shard-tokens 1e400", "harvest --out x --shard-tokens 1e400", 2, "--shard-tokens", None),
    ("usage", "harvest --seq-len 0", "harvest --out x --seq-len 0", 2, "--seq-len: must be >= 2", None),
    ("usage", "eval without --release", "eval", 2, "required: --release", None),
    ("usage", "eval --tokens inf", "eval --release x --tokens inf", 2, "--tokens: not a whole number", None),
    ("usage", "eval --kind nope", "eval --release x --kind nope", 2, "--kind: invalid choice", None),
    ("usage", "features --top-k 0", "features --release x --top-k 0", 2, "--top-k", None),
    ("usage", "features --batch-tokens -1", "features --release x --batch-tokens -1", 2, "--batch-tokens", None),
    ("usage", "browse --port 70000", "browse x --port 70000", 2, "--port: must be in [0, 65535]", None),
    ("usage", "run --eval-tokens 0", "run --out x --eval-tokens 0", 2, "--eval-tokens: must be >= 1", None),
    ("usage", "run --canonical-l0 nan", "run --out x --canonical-l0 nan", 2, "--canonical-l0: not a finite", None),
    # --- bad input: refused in a line, exit 1 --------------------------------------------------
    ("input", "train with neither --store nor --model", "train", 1, "give either --store", None),
    ("input", "train --arch topk without --k", T + " --arch topk --out {tmp}/o", 1, "needs --k", None),
    ("input", "train --arch nope", T + " --arch nope --out {tmp}/o", 1, "nope", None),
    ("input", "train --target-l0 above the width", T + " --target-l0 20,64 --out {tmp}/o", 1,
     "target L0 64 for layer_1/resid_post must lie in (0, d_sae = 32]", None),
    ("input", "train --target-l0 with two λ", T + " --target-l0 8 --l0-coefficients 1e-3,1e-2 --out {tmp}/o", 1,
     "exactly one sparsity coefficient", None),
    ("input", "train --target-l0 for topk", T + " --arch topk --k 4 --target-l0 4 --out {tmp}/o", 1,
     "--target-l0 is for jumprelu and matryoshka_jumprelu", None),
    ("input", "train --max-frequency for topk", T + " --arch topk --k 4 --max-frequency 0.1 --out {tmp}/o", 1,
     "the frequency penalty (max_frequency) acts on JumpReLU thresholds", None),
    ("input", "train --prefixes not increasing", T + " --arch matryoshka_jumprelu --prefixes 16,8 --out {tmp}/o", 1,
     "Matryoshka prefixes must be strictly increasing, got [16, 8]", None),
    ("input", "train --prefixes for plain jumprelu", T + " --prefixes 8 --out {tmp}/o", 1,
     "prefixes are for Matryoshka architectures", None),
    ("input", "run --kind-split not dividing the batch", "run --out {tmp}/o --kind-split mlp_out=3", 1,
     "--kind-split mlp_out=3 does not divide the batch of 1024", None),
    ("input", "run --kind-k one kind twice", "run --out {tmp}/o --kind-k mlp_out=100 --kind-k mlp_out=140", 1,
     "site kind mlp_out given two values (100 and 140)", None),
    ("input", "train --kind-split not dividing the batch", T + " --kind-split resid_post=3 --out {tmp}/o", 1,
     "kind_splits: resid_post=3 does not divide the batch of 256", None),
    ("input", "train online without --tokens", "train --model {model} --out {tmp}/o", 1, "needs --tokens", None),
    ("input", "harvest --model missing", H + " --model {tmp}/no-model --out {tmp}/o", 1, "no-model", None),
    ("input", "harvest --corpus missing", H + " --corpus {tmp}/none.txt --out {tmp}/o", 1, "none.txt does not exist",
     None),
    ("input", "harvest --corpus binary .txt", H + " --corpus {tmp}/binary.txt --out {tmp}/o", 1,
     "binary.txt is a binary file, not text", None),
    ("input", "harvest --corpus binary .jsonl", H + " --corpus {tmp}/binary.jsonl --out {tmp}/o", 1,
     "binary.jsonl:1: not UTF-8 text", None),
    ("input", "harvest --corpus bad JSON line", H + " --corpus {tmp}/bad.jsonl --out {tmp}/o", 1,
     "bad.jsonl:2: not valid JSON", None),
    ("input", "harvest --seq-len past the context", H + " --seq-len 1000 --out {tmp}/o", 1,
     "beyond the model's context length (256 tokens)", None),
    ("input", "harvest --sites bogus", H + " --sites bogus --out {tmp}/o", 1, "unknown site selection 'bogus'", None),
    ("input", "harvest --device banana", H + " --device banana --out {tmp}/o", 1, "unknown device 'banana'", None),
    ("input", "train --device cuda:99", T + " --device cuda:99 --out {tmp}/o", 1, "cuda", None),
    ("input", "eval --release missing", E.replace("{release}", "{tmp}/nowhere"), 1, "does not exist", None),
    ("input", "eval --model missing", E + " --model {tmp}/no-model", 1, "no-model", None),
    ("input", "eval SAE d_in not the site's", E.replace("{release}", "{mismatch}"), 1,
     "has d_in 48, but site layer_1/attn_z of this model is 64 wide", None),
    ("input", "features SAE d_in not the site's", F.replace("{release}", "{mismatch}") + " --out {tmp}/f", 1,
     "has d_in 48, but site layer_1/attn_z of this model is 64 wide", None),
    ("input", "features --seq-len past the context", F + " --seq-len 1024 --out {tmp}/f", 1,
     "seq_len 1024 is beyond the model's context length", None),
    ("input", "features --release missing", F.replace("{release}", "{tmp}/nowhere"), 1, "does not exist", None),
    ("input", "browse a missing run", "browse {tmp}/nowhere", 1, "no feature database", None),
    ("input", "browse a file that is not a database", "browse {tmp}/not-a-db.sqlite", 1,
     "is not a saescope feature database", None),
    ("input", "run --preset nope", "run --out {tmp}/o --preset nope", 1, "unknown preset 'nope'", None),
    ("input", "run --model missing", "run --out {tmp}/run-o --model {tmp}/no-model --corpus {corpus} "
     "--eval-corpus {corpus}", 1, "no-model", None),
    # --- corrupt files saescope reads back: the message names the file -------------------------
    ("corrupt", "store manifest not JSON", T.replace("{store}", "{bad_manifest}") + " --out {tmp}/o", 1,
     "manifest.json: not valid JSON", None),
    ("corrupt", "store manifest binary", T.replace("{store}", "{bin_manifest}") + " --out {tmp}/o", 1,
     "manifest.json: not UTF-8 text (a binary file?)", None),
    ("corrupt", "SAE config.json not JSON", E.replace("{release}", "{bad_config}"), 1, "config.json: not valid JSON",
     None),
    ("corrupt", "train --store that is no store", T.replace("{store}", "{tmp}") + " --out {tmp}/o", 1,
     "no activation store", None),
    # --- output paths, checked before any compute ----------------------------------------------
    ("output", "harvest --out is a file", H + " --out {afile}", 1, "--out {afile} is a file, not a folder", None),
    ("output", "harvest --out under a file", H + " --out {afile}/sub", 1, "not a folder", None),
    ("output", "train --out is a file", T + " --out {afile}", 1, "--out {afile} is a file", None),
    ("output", "eval --report is a file", E + " --report {afile}", 1, "--report {afile} is a file", None),
    ("output", "features --out is a file", F + " --out {afile}", 1, "--out {afile} is a file", None),
    ("output", "run --out is a file", "run --out {afile}", 1, "--out {afile} is a file", None),
    # --- environment faults --------------------------------------------------------------------
    ("fault", "train: disk full (ENOSPC)", T + " --out {tmp}/full_out", 1, "no space left on device", "enospc"),
    ("fault", "harvest: read-only disk (EROFS)", H + " --out {tmp}/ro_out", 1,
     "ro_out cannot be written: {tmp}/ro_out: read-only file system", "erofs"),
    ("fault", "features: permission denied (EACCES)", F + " --out {tmp}/locked_out", 1, "permission denied", "eacces"),
    ("fault", "harvest: Ctrl-C", H + " --out {tmp}/o", 130, "interrupted; rerun the same command", "ctrl_c"),
]

#: cases whose traceback is wanted: the debug switches, and a genuine bug
TRACEBACK_CASES = [
    ("debug", "--debug after the command", "train --store {tmp}/nowhere --debug", 1, "no activation store at", None),
    ("debug", "--debug before the command", "--debug train --store {tmp}/nowhere", 1, "no activation store at", None),
    ("debug", "SAESCOPE_DEBUG=1", "train --store {tmp}/nowhere", 1, "no activation store at", "debug_env"),
    ("bug", "a KeyError inside saescope", H + " --out {tmp}/o", 1, "this is a bug in saescope; please report it",
     "bug"),
]


def _make_world(root: Path) -> dict[str, str]:
    """The tiny model, corpus, store and release every case points at, and broken copies of them."""
    from conftest import build_tiny_model
    from test_features_cli import save_word_model
    from test_features_server import WORDS

    from saescope.cli import main

    save_word_model(root / "model", build_tiny_model)
    rng = random.Random(0)
    with open(root / "corpus.jsonl", "w") as f:  # distinct documents, so the held-out split is not empty
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=12))}) + "\n")
    (root / "binary.txt").write_bytes(b"\x7fELF\x02\x01\x00\x00" + bytes(range(256)) * 4)
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01" * 64)
    (root / "bad.jsonl").write_text('{"text": "Paris is the capital"}\n{"text": oops}\n')
    (root / "afile").write_text("a file where a folder should be\n")
    (root / "not-a-db.sqlite").write_bytes(b"\x00" * 512)
    w = {"tmp": str(root), "model": str(root / "model"), "corpus": str(root / "corpus.jsonl"),
         "afile": str(root / "afile"), "store": str(root / "run" / "store"), "release": str(root / "run" / "release")}
    assert main(["harvest", "--model", w["model"], "--corpus", w["corpus"], "--sites", "resid_post@1", "--seq-len",
                 "32", "--tokens", "1500", "--out", str(root / "run"), "--device", "cpu", "--no-progress"]) == 0
    assert main(["train", "--store", w["store"], "--widths", "32", "--batch-size", "256", "--device", "cpu",
                 "--no-progress"]) == 0
    (sae,) = (root / "run" / "release").glob("*/*/*/*")
    # the same SAE filed as an attn_z SAE: its d_in (48) is not attn_z's width (64)
    mismatch = root / "mismatch" / "attn_z" / "layer_1" / "width_32" / sae.name
    shutil.copytree(sae, mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "site": "layer_1/attn_z"}))
    # a consistent folder (checksums rewritten): the mismatch, not damage, is what must be named
    names = [line.split(maxsplit=1)[1].lstrip("*") for line in (mismatch / CHECKSUMS).read_text().splitlines()]
    write_checksums(mismatch, names)
    bad_config = root / "bad_config" / sae.relative_to(root / "run" / "release")
    shutil.copytree(sae, bad_config)
    (bad_config / "config.json").write_text('{"site": "layer_1/resid_post", ')
    for name, content in (("bad_manifest", b'{"format": "saescope-act'), ("bin_manifest", b"\x89PNG\r\n\x1a\n\xff")):
        shutil.copytree(root / "run" / "store", root / name)
        (root / name / "manifest.json").write_bytes(content)
        w[name] = str(root / name)
    w.update(mismatch=str(root / "mismatch"), bad_config=str(root / "bad_config"))
    return w


def _run(case, world: dict[str, str]) -> subprocess.CompletedProcess:
    _, _, line, _, _, fault = case
    argv = [a.format(**world) for a in line.split()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("SAESCOPE_DEBUG", None)
    if fault == "debug_env":
        env["SAESCOPE_DEBUG"] = "1"
    prelude = FAULTS.get(fault, "")
    code = f"{prelude}import runpy, sys\nsys.argv = ['saescope', *{argv!r}]\nrunpy.run_module('saescope', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=world["tmp"],
                          timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    world = _make_world(tmp_path_factory.mktemp("cli_errors"))
    everything = CASES + TRACEBACK_CASES
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        done = dict(zip((c[1] for c in everything), pool.map(lambda c: _run(c, world), everything)))
    return world, done


def _check(case, results, *, traceback_wanted: bool):
    world, done = results
    category, name, line, code, fragment, _ = case
    r = done[name]
    shown = f"$ saescope {line}\nexit {r.returncode}\n--- stderr:\n{r.stderr[-3000:]}\n--- stdout:\n{r.stdout[-1000:]}"
    assert r.returncode == code, shown
    assert fragment.format(**world) in r.stderr + r.stdout, shown
    assert ("Traceback (most recent call last)" in r.stderr) == traceback_wanted, shown
    if code == 1 or code == 130:
        command = next((w for w in line.split() if not w.startswith("-")), "")
        errors = [x for x in r.stderr.splitlines() if x.startswith(f"saescope {command}: ")]
        assert errors, shown  # the message is prefixed with the command it came from
        if not traceback_wanted:
            assert len(errors) == 1 and "error: " in errors[0], shown


@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
def test_user_and_environment_errors_are_one_clear_line(case, results):
    _check(case, results, traceback_wanted=False)


@pytest.mark.parametrize("case", TRACEBACK_CASES, ids=[c[1] for c in TRACEBACK_CASES])
def test_debug_and_genuine_bugs_show_the_traceback(case, results):
    _check(case, results, traceback_wanted=True)


def test_no_case_left_partial_output_in_a_refused_folder(results):
    """Output folders refused up front stay as they were: the file is untouched, nothing is created
    beside it, and a harvest stopped by Ctrl-C wrote no store."""
    world, _ = results
    assert Path(world["afile"]).read_text() == "a file where a folder should be\n"
    assert not (Path(world["tmp"]) / "ro_out").exists()
    assert not (Path(world["tmp"]) / "o" / "store" / "manifest.json").exists()
