"""Fuzz ``onnx-ssl prune`` with random CNN graphs; write every failing graph, shrunk.

    python scripts/fuzz_prune.py --seeds 0:2000 --workers 2 --out out/fuzz
    python scripts/fuzz_prune.py --replay out/fuzz/seed-17/minimal.json

Each seed is a random graph with channels zeroed (``tests/fuzz_graphs.py`` says which graphs
and which properties). Every case runs in a child process with a time limit, so a hang is a
failure like any other. For a failing seed, ``OUT/seed-N/`` gets ``case.json`` and
``zeroed.onnx`` (the model handed to prune), ``failures.txt``, and the shrunk case that
still fails the same way: ``minimal.json``, ``minimal.onnx`` and ``minimal.txt`` (with the
command that replays it). The summary line gives the pass rate and the failure classes.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzz_graphs as fg  # noqa: E402


def _seeds(spec: str) -> list[int]:
    """``LO:HI`` (half-open), or seeds and ranges separated by commas."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition(":")
        out += list(range(int(lo), int(hi))) if hi else [int(lo)]
    return out


def _write_case(folder: Path, stem: str, case: fg.Case, fails: list[fg.Failure]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(fg.dumps(case) + "\n")
    onnx.save_model(fg.zeroed(fg.build(case), case), str(folder / f"{stem}.onnx"))
    lines = [case.describe(), *(f"{k}: {m}" for k, m in fails),
             f"replay: python scripts/fuzz_prune.py --replay {folder / f'{stem}.json'}",
             f"prune:  onnx-ssl prune {folder / f'{stem}.onnx'} -o /tmp/pruned.onnx"]
    (folder / f"{stem}.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0:1000",
                    help="LO:HI (half-open), or seeds and ranges separated by commas")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=fg.TIMEOUT_S,
                    help="seconds for one case; past it the case counts as a hang")
    ap.add_argument("--out", type=Path, default=Path("out/fuzz"))
    ap.add_argument("--no-shrink", action="store_true")
    ap.add_argument("--shrink-budget", type=int, default=60, help="cases tried per shrink")
    ap.add_argument("--replay", type=Path, help="run one case JSON and print its failures")
    args = ap.parse_args(argv)

    if args.replay:
        case = fg.Case.from_json(json.loads(args.replay.read_text()))
        worker = fg.Worker()
        try:
            fails = worker.run(case, args.timeout)
        finally:
            worker.close()
        print(case.describe())
        for k, m in fails:
            print(f"  {k}: {m}")
        print("passed" if not fails else f"{len(fails)} failure(s)")
        return 1 if fails else 0

    seeds = _seeds(args.seeds)
    local = threading.local()
    workers: list[fg.Worker] = []
    lock = threading.Lock()

    def worker() -> fg.Worker:
        if not hasattr(local, "worker"):
            local.worker = fg.Worker()
            with lock:
                workers.append(local.worker)
        w: fg.Worker = local.worker
        return w

    def one(seed: int) -> tuple[int, list[fg.Failure]]:
        case = fg.random_case(seed)
        fails = worker().run(case, args.timeout)
        if not fails:
            return seed, fails
        folder = args.out / f"seed-{seed}"
        _write_case(folder, "case", case, fails)
        if not args.no_shrink:
            cls = fails[0][0]

            def same(c: fg.Case) -> bool:
                return any(k == cls for k, _ in worker().run(c, args.timeout))

            small = fg.shrink(case, same, args.shrink_budget)
            _write_case(folder, "minimal", small, worker().run(small, args.timeout))
        return seed, fails

    t0 = time.perf_counter()
    classes: collections.Counter[str] = collections.Counter()
    failed = 0
    try:
        with ThreadPoolExecutor(max(1, args.workers)) as ex:
            for done, (seed, fails) in enumerate(ex.map(one, seeds), 1):
                if fails:
                    failed += 1
                    classes.update({k for k, _ in fails})
                    print(f"seed {seed}: " + "; ".join(f"{k}: {m}" for k, m in fails)[:300],
                          flush=True)
                if done % 100 == 0:
                    print(f"... {done}/{len(seeds)} seeds, {failed} failing", flush=True)
    finally:
        for w in workers:
            w.close()
    n = len(seeds)
    print(f"passed {n - failed}/{n} seeds ({(n - failed) / n:.1%}) in "
          f"{time.perf_counter() - t0:.0f}s; failure classes: {dict(classes) or 'none'}"
          + (f"; failing graphs in {args.out}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
