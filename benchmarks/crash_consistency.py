"""Crash consistency, proven the way databases prove it: SIGKILL a command at many points, rerun
it, and check that the end state equals an uninterrupted run's.

Each of ``saescope harvest``, ``saescope train`` (from a store) and ``saescope run`` (store
source, every stage) runs once uninterrupted on a tiny Gemma 3 saved with a word-level tokenizer
(the test suite's models) and a folder of text files.  Then, for every kill point, a fresh copy
is started as a subprocess and SIGKILLed

* at each **stage boundary**, by an observer that polls the output folder and kills the moment a
  file appears: a shard group recorded in the manifest, a checkpoint folder, a temporary release
  folder (the ghost SAE of issue 11), ``train_summary.json``, each ``run.json`` stage, the
  temporary feature database, ...;
* after **random delays** (seeded), which land anywhere, including inside file writes.

The same command is then rerun to completion and its end state compared with the reference's:
store shards, ``tokens.safetensors`` and ``manifest.json`` byte for byte; released arrays bit for
bit, with the same folder names and ``canonical.json``.  A point whose trigger never fired
before the command finished (it was too quick) is reported, not counted.

    PYTHONPATH=. python3 benchmarks/crash_consistency.py [--random 3] [--seed 0] [--only harvest,train,run]

``--budget SECONDS`` bounds the time: points left when it runs out are skipped and reported.
The test suite drives :func:`run_points` on one point (tests/test_crash_consistency.py).

Measured (``--random 2``, 2 shared CPU cores): 23 points tried, 22 killed (one random delay fell
after the command had finished), 22 end states identical — harvest 6/6, train 8/8, run 8/8 — in
521 s; an uninterrupted harvest, train and run take 12 s, 11 s and 26 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOCK = ".saescope.lock"


# --- the tiny model and corpus -------------------------------------------------------------------


def make_inputs(folder: Path) -> tuple[Path, Path]:
    """A tiny Gemma 3 with a word-level tokenizer (``save_pretrained``) and a folder of documents."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_model
    from test_features_server import WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    model_dir, corpus_dir = folder / "model", folder / "corpus"
    if not (model_dir / "config.json").exists():
        vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                            unk_token="<unk>", pad_token="<pad>")
        model = build_tiny_model("gemma3", vocab_size=len(vocab), bos_token_id=2, eos_token_id=1, pad_token_id=0)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(120):
        (corpus_dir / f"doc_{i:03d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))))
    return model_dir, corpus_dir


# --- the commands ---------------------------------------------------------------------------------


def commands(model: Path, corpus: Path) -> dict[str, Callable[[Path], list[str]]]:
    """Each command's arguments for a work folder ``w`` (its output is ``w/out``)."""
    common = ["--model", str(model), "--corpus", str(corpus), "--seq-len", "32", "--device", "cpu", "--no-progress"]
    train = ["--widths", "32", "--batch-size", "64", "--checkpoint-every", "3", "--lr", "3e-3"]
    return {
        "harvest": lambda w: ["harvest", *common, "--sites", "all@0-1", "--tokens", "3000", "--shard-tokens", "256",
                              "--batch-seqs", "2", "--out", str(w / "out")],
        "train": lambda w: ["train", "--store", str(w / "out" / "store"), "--sites", "all@0-1", *train,
                            "--l0-coefficients", "1e-3,3e-3", "--tokens", "1920", "--device", "cpu", "--no-progress"],
        "run": lambda w: ["run", "--preset", "quick", *common, "--eval-corpus", str(corpus), "--sites",
                          "layer_1/resid_post,layer_2/mlp_out", *train, "--k", "8", "--tokens", "1920",
                          "--eval-tokens", "256", "--eval-loss-tokens", "64", "--feature-tokens", "256",
                          "--source", "store", "--out", str(w / "out")],
    }


def prepare(name: str, work: Path, reference: Path | None) -> None:
    """Put what a command starts from into ``work``: ``train`` reads the reference harvest's store."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if name == "train":
        shutil.copytree(reference / "out" / "store", work / "out" / "store")


# --- kill triggers: stage boundaries, observed from outside ---------------------------------------


def _manifest_groups(out: Path) -> int:
    try:
        return len(json.loads((out / "store" / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return -1


def _stages(out: Path) -> set[str]:
    try:
        return set(json.loads((out / "run.json").read_text())["stages"])
    except (OSError, ValueError, KeyError):
        return set()


def _exists(pattern: str) -> Callable[[Path], bool]:
    return lambda out: next(out.glob(pattern), None) is not None


BOUNDARIES: dict[str, dict[str, Callable[[Path], bool]]] = {
    "harvest": {
        "store manifest created": lambda out: _manifest_groups(out) >= 0,
        "shard group 0 recorded": lambda out: _manifest_groups(out) >= 1,
        "shard group 3 recorded": lambda out: _manifest_groups(out) >= 4,
        "a shard half written": _exists("store/layer_*/*/.shard_*.tmp-*"),
    },
    "train": {
        "run identity written": _exists("checkpoints/run.json"),
        "checkpoint 1 renamed into place": _exists("checkpoints/step_000000003"),
        "checkpoint 1 half written": _exists("checkpoints/.step_000000006.tmp-*"),
        "checkpoint 4 pointed to": lambda out: '"step_000000012"' in _read(out / "checkpoints" / "latest.json"),
        "a release folder half written": _exists("release/*/*/*/.average_l0_*.tmp-*"),
        "first release folder in place": _exists("release/*/*/*/average_l0_*/SHA256SUMS"),
    },
    "run": {
        "run.json written": _exists("run.json"),
        "harvest under way": lambda out: _manifest_groups(out) >= 1,
        "training under way": _exists("checkpoints/step_*"),
        "a release folder half written": _exists("release/*/*/*/.average_l0_*.tmp-*"),
        "train stage recorded": lambda out: "train" in _stages(out),
        "eval stage recorded": lambda out: "eval" in _stages(out),
        "feature database half written": _exists("features/.features.sqlite.tmp-*"),
    },
}


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@dataclass
class Point:
    command: str
    name: str
    trigger: Callable[[Path], bool] | None = None
    delay: float | None = None
    #: filled in by :func:`run_points`
    killed: bool = False
    identical: bool | None = None
    detail: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# --- running and killing --------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def saescope(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saescope", *argv], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_killed(argv: list[str], out: Path, point: Point, timeout: float = 600) -> bool:
    """Start the command and SIGKILL it when the point's trigger fires (or its delay passes);
    returns whether it was killed (False: it finished first)."""
    proc = subprocess.Popen([sys.executable, "-m", "saescope", *argv], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            fire = (point.delay is not None and elapsed >= point.delay) or \
                   (point.trigger is not None and out.exists() and point.trigger(out))
            if fire:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            if elapsed > timeout:
                raise TimeoutError(f"{argv[0]} ran past {timeout}s")
            time.sleep(0.002)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:1])} failed before the kill point: {proc.stderr.read()[-2000:]}")
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- end states -----------------------------------------------------------------------------------


def store_state(out: Path) -> dict[str, bytes]:
    """Every file of the store but its lock, byte for byte."""
    store = out / "store"
    return {p.relative_to(store).as_posix(): p.read_bytes()
            for p in sorted(store.rglob("*")) if p.is_file() and p.name != LOCK}


def release_state(out: Path) -> dict[str, object]:
    """Released folders (names), their arrays (exact) and the canonical choice; no ghost folders."""
    from saescope.release.load import verify_checksums

    release = out / "release"
    state: dict[str, object] = {}
    for npz in sorted(release.rglob("params.npz")):
        folder = npz.parent
        name = folder.relative_to(release).as_posix()
        verify_checksums(folder)
        with np.load(npz) as arrays:
            state[name] = {k: arrays[k].tobytes() for k in sorted(arrays.files)}
    canonical = release / "canonical.json"
    if canonical.exists():
        state["canonical.json"] = canonical.read_bytes()
    return state


def end_state(command: str, out: Path) -> dict:
    if command == "harvest":
        return store_state(out)
    state = release_state(out)
    if command == "run":
        state["stages"] = sorted(_stages(out))
        state["features"] = (out / "features" / "features.sqlite").exists()
    return state


def compare(reference: dict, state: dict) -> str:
    """'' when equal, else what differs (first few keys)."""
    if reference == state:
        return ""
    keys = sorted(set(reference) | set(state))
    differ = [k for k in keys if reference.get(k) != state.get(k)]
    return "differs: " + ", ".join(differ[:5])


# --- the harness ----------------------------------------------------------------------------------


def reference_runs(base: Path, names: list[str]) -> tuple[dict[str, Path], dict[str, dict], dict[str, float]]:
    model, corpus = make_inputs(base)
    argv = commands(model, corpus)
    refs, states, seconds = {}, {}, {}
    for name in ("harvest", "train", "run"):
        if name not in names and not (name == "harvest" and "train" in names):
            continue
        work = base / f"ref_{name}"
        prepare(name, work, refs.get("harvest"))
        t0 = time.monotonic()
        done = saescope(argv[name](work))
        if done.returncode != 0:
            raise RuntimeError(f"reference {name} failed:\n{done.stderr[-3000:]}")
        seconds[name] = time.monotonic() - t0
        refs[name], states[name] = work, end_state(name, work / "out")
    return refs, states, seconds


def plan_points(names: list[str], n_random: int, seconds: dict[str, float], seed: int) -> list[Point]:
    rng = random.Random(seed)
    points = []
    for name in names:
        points += [Point(name, f"at: {label}", trigger=t) for label, t in BOUNDARIES[name].items()]
        for _ in range(n_random):
            delay = rng.uniform(0.2, 0.95) * seconds[name]
            points.append(Point(name, f"after {delay:.2f}s", delay=delay))
    return points


def run_points(base: Path, names: list[str], n_random: int = 2, seed: int = 0, budget: float = 1e9,
               boundaries: dict[str, list[str]] | None = None, log=print) -> list[Point]:
    """Reference runs, then every kill point (``boundaries`` limits the stage-boundary points per
    command by label); returns the points with their outcome."""
    t_start = time.monotonic()
    model, corpus = make_inputs(base)
    argv = commands(model, corpus)
    refs, states, seconds = reference_runs(base, names)
    log("uninterrupted: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    points = plan_points(names, n_random, seconds, seed)
    if boundaries is not None:
        points = [p for p in points if p.delay is not None or p.name[4:] in boundaries.get(p.command, [])]
    for i, point in enumerate(points):
        if time.monotonic() - t_start > budget:
            point.detail = "skipped: time budget spent"
            continue
        work = base / f"trial_{i:02d}"
        prepare(point.command, work, refs.get("harvest"))
        out = work / "out"
        t0 = time.monotonic()
        point.killed = run_killed(argv[point.command](work), out, point)
        if point.killed:
            ghosts = [p for p in out.rglob(".*") if ".tmp-" in p.name]
            if ghosts:
                point.notes.append(f"{len(ghosts)} temporary file(s) left by the kill")
            done = saescope(argv[point.command](work))
            if done.returncode != 0:
                point.identical, point.detail = False, f"rerun failed: {done.stderr.strip()[-300:]}"
            else:
                point.detail = compare(states[point.command], end_state(point.command, out))
                point.identical = not point.detail
                leftover = [p for p in out.rglob(".*") if ".tmp-" in p.name]
                if leftover:
                    point.identical, point.detail = False, f"temporary files left after the rerun: {leftover[:3]}"
        else:
            point.detail = "not reached: the command finished first"
        point.seconds = time.monotonic() - t0
        shutil.rmtree(work, ignore_errors=True)
        log(f"{point.command:8s} {point.name:36s} killed={point.killed!s:5s} identical={point.identical!s:5s} "
            f"{point.seconds:5.1f}s {point.detail} {'; '.join(point.notes)}")
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="harvest,train,run")
    parser.add_argument("--random", type=int, default=3, help="random-delay kill points per command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=900, help="seconds; points beyond it are skipped")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    import tempfile

    base = args.work or Path(tempfile.mkdtemp(prefix="saescope-crash-"))
    t0 = time.monotonic()
    points = run_points(base, args.only.split(","), args.random, args.seed, args.budget)
    killed = [p for p in points if p.killed]
    same = [p for p in killed if p.identical]
    print(f"\nkill points tried: {len(points)}; killed: {len(killed)}; identical end states: {len(same)}; "
          f"not reached: {sum(p.detail.startswith('not reached') for p in points)}; "
          f"skipped: {sum(p.detail.startswith('skipped') for p in points)}; {time.monotonic() - t0:.0f}s")
    for name in args.only.split(","):
        mine = [p for p in killed if p.command == name]
        print(f"  {name}: {len(mine)} killed, {sum(bool(p.identical) for p in mine)} identical")
    if args.work is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if len(same) == len(killed) else 1


if __name__ == "__main__":
    sys.exit(main())
