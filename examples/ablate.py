"""BSA ablations (the paper's "first experiments"): each branch removed, compression block, top-k,
per-query vs group compression, ball size, the selection rule; every variant at the same number of steps and seeds.

    python examples/ablate.py --list -- --hidden 128 --layers 6 --ball-size 256    # the variants, no training
    python examples/ablate.py --preset branches topk --seeds 0 1 2 --steps 2000 --isolate --out runs/ablate \\
        -- --dataset car --data-size full ...

Every variant is ``--model bsa`` with the train.py flags after ``--`` (the base configuration) and
its own flags after them (so they override): ``bsa`` is the base itself; ``no-ball``, ``no-cmp``,
``no-slc`` hold one branch's gate at 0 (train.py ``--drop-branch``); ``ball-only`` is ``--model
ball`` (no compression or selection at all); ``cmpN``, ``topkN``, ``ballN`` set one size;
``per-query``/``group`` the compression mode; ``shared``/``per-head`` the block-selection rule (ours,
the BSA authors'). Variants whose flags define the same run as another
(``cmp8`` when the base has ``--cmp-block 8``) run once, under one label naming them all. Results go
through compare.py's table, JSON and plots (``ablate.png``, ``ablate_time.png``), "vs" the base;
``--reuse`` keeps finished runs and resumes killed ones, as in compare.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (examples/compare.py)
import train  # noqa: E402  (examples/train.py)

PRESETS: Dict[str, List[Tuple[str, List[str]]]] = {
    "branches": [("bsa", []), ("no-ball", ["--drop-branch", "ball"]), ("no-cmp", ["--drop-branch", "cmp"]),
                 ("no-slc", ["--drop-branch", "slc"]), ("ball-only", ["--model", "ball"])],
    "cmp-block": [(f"cmp{n}", ["--cmp-block", str(n)]) for n in (8, 16, 32)],
    "topk": [(f"topk{n}", ["--topk", str(n)]) for n in (4, 8, 16)],
    "compression": [("per-query", []), ("group", ["--group-compression"])],
    "ball": [(f"ball{n}", ["--ball-size", str(n)]) for n in (128, 256)],
    "selection": [("shared", []), ("per-head", ["--selection", "per_head"])],
    # the selection gate's starting value (the selection branch hurt at short budgets: results.md)
    "gate-init": [("slc-init-2", ["--gate-bias", "0", "0", "-2"]), ("slc-init-4", ["--gate-bias", "0", "0", "-4"]),
                  ("linear-gates", ["--linear-gates"])],
}


def variants(presets: Sequence[str], base: List[str], only: Optional[Sequence[str]] = None) -> List[Dict]:
    r"""The runs of ``presets`` on the base flags: one dict per distinct run (``label``, ``names``,
    ``flags``: the variant's own flags, ``train_flags``: all of them), in preset order."""
    chosen = [v for p in (PRESETS if "all" in presets else presets) for v in PRESETS[p]]
    if only:
        unknown = sorted(set(only) - {n for n, _ in chosen})
        if unknown:
            raise ValueError(f"--variants: unknown {unknown}; the presets {list(presets)} have "
                             f"{[n for n, _ in chosen]}")
        chosen = [v for v in chosen if v[0] in only]
    runs: List[Dict] = []
    by_config: Dict[str, Dict] = {}
    for name, flags in chosen:
        full = ["--model", "bsa"] + base + flags
        key = json.dumps(train.run_config(train.parse_args(full)), sort_keys=True)
        if key in by_config:
            if name not in by_config[key]["names"]:
                by_config[key]["names"].append(name)
            continue
        by_config[key] = {"names": [name], "flags": flags, "train_flags": full}
        runs.append(by_config[key])
    for r in runs:
        r["label"] = r["names"][0] + (f" (= {', '.join(r['names'][1:])})" if len(r["names"]) > 1 else "")
        r["dir"] = r["names"][0]
    return runs


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["all"], choices=list(PRESETS) + ["all"])
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME", help="only these variants of the presets")
    p.add_argument("--list", action="store_true", help="print the variants and their flags, train nothing")
    p.add_argument("--seeds", nargs="+", type=compare._seed, default=[0], metavar="SEED")
    p.add_argument("--steps", type=train._positive_int, default=150, help="steps of every run")
    p.add_argument("--curve-points", type=train._positive_int, default=10, help="evaluations per run")
    p.add_argument("--isolate", action="store_true", help="every run in its own Python process")
    p.add_argument("--reuse", action="store_true", help="keep finished runs, resume killed ones (compare.py)")
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--results", default=None, help="markdown table (default OUT/results.md)")
    p.add_argument("--json", default=None, help="JSON (default: --results with .json)")
    p.add_argument("--title", default="BSA ablations at equal training steps")
    args, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: each seed once, got {args.seeds}")
    if any(f == "--seed" or f.startswith("--seed=") for f in rest):
        p.error("--seeds sets train.py's --seed of every run: leave --seed out of the train.py flags")
    try:
        args.runs = variants(args.preset, rest, args.variants)
    except SystemExit:
        p.error("train.py rejected the flags of a variant (its error is above)")
    except ValueError as e:
        p.error(str(e))
    args.train_args = rest
    args.results = args.results or os.path.join(args.out, "results.md")
    args.json = args.json or os.path.splitext(args.results)[0] + ".json"
    # what compare.markdown reads
    args.models = [r["label"] for r in args.runs]
    args.ref_model = args.runs[0]["label"]
    args.script, args.deadline_s, args.budget_s, args.equal_time = "examples/ablate.py", None, None, False
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.list:
        for r in args.runs:
            log(f"{r['label']}: {' '.join(r['flags']) or '(the base flags)'}")
        return []
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    for path in (args.results, args.json):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    steps = {r["label"]: args.steps for r in args.runs}
    rows: List[Dict] = []

    def write():
        md = compare.markdown(rows, args, steps, argv)
        md += "\nVariants (their flags come after the base flags):\n\n" + "".join(
            f"- `{r['label']}`: `{' '.join(r['flags']) or '(base)'}`\n" for r in args.runs)
        with open(args.results, "w") as f:
            f.write(md)
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "seeds": args.seeds, "argv": argv,
                       "variants": {r["label"]: r["flags"] for r in args.runs}, "rows": rows,
                       "summary": compare.summarize(rows, args.models)}, f, indent=1, default=str)
        compare.plot(rows, os.path.join(args.out, "ablate.png"), os.path.join(args.out, "ablate_time.png"))
        return md

    for seed in args.seeds:
        for r in args.runs:
            out = os.path.join(args.out, r["dir"], f"seed{seed}")
            flags = r["train_flags"] + ["--seed", str(seed), "--steps", str(args.steps), "--out", out,
                                        "--no-progress"]
            if "--eval-every" not in flags:
                flags += ["--eval-every", str(max(1, args.steps // args.curve_points))]
            met = compare._finished(flags, out) if args.reuse else None
            if met is None:
                resume = args.reuse and os.path.isfile(os.path.join(out, "checkpoint.pt"))
                log(f"[ablate] {r['label']} (seed {seed}): train.py {' '.join(flags)}")
                met = compare._train(flags + (["--resume"] if resume else []), out, isolate=args.isolate)
                if resume and "error" in met:
                    log(f"[ablate] resuming {out} failed ({met['error'][:200]}); starting it afresh")
                    met = compare._train(flags, out, isolate=args.isolate)
            else:
                log(f"[ablate] {r['label']} (seed {seed}): finished run kept from {out} (--reuse)")
            met["train_model"], met["model"], met["variant_flags"] = met.get("model"), r["label"], r["flags"]
            met.setdefault("seed", seed)
            rows.append(met)
            write()
    print(write())
    log(f"[ablate] done in {time.perf_counter() - t0:.0f}s; table in {args.results}, JSON in {args.json}")
    return rows


if __name__ == "__main__":
    main()
