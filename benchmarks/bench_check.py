"""``make bench-check``: a short same-run comparison that fails on a regression.

Runs ``embed_cpu.py`` with the platform's default (``auto``), both fixed
precisions and ``SentenceTransformer.encode``, alternating, and exits 1 when

- ``auto`` is more than 5% slower than the faster fixed precision (its
  load-time timing chose wrong on this machine), or
- the platform is below 1.3x ``encode``.

Timing on a shared machine is noise for a test, so this is not part of
``make test``; run it before you stop and quote its output.

    python benchmarks/bench_check.py --rows 2000 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import embed_cpu

AUTO_SLACK = 0.05
MIN_OVER_ENCODE = 1.3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1, help="corpus seed (1: not the corpus the code was tuned on)")
    args = parser.parse_args(argv)
    summary = embed_cpu.main(["--rows", str(args.rows), "--repeats", str(args.repeats), "--seed", str(args.seed),
                              "--no-peak", "--variants", "platform,platform_fp32,platform_bf16,st"])
    rate = summary["sentences_per_s"]
    missing = {"platform", "platform_fp32", "platform_bf16", "st"} - set(rate)
    if missing:
        print(f"bench-check: FAILED: variants did not run: {', '.join(sorted(missing))}")
        return 1
    fixed = max(rate["platform_fp32"], rate["platform_bf16"])
    auto_vs_fixed = rate["platform"] / fixed
    over_encode = rate["platform"] / rate["st"]
    problems = []
    if auto_vs_fixed < 1 - AUTO_SLACK:
        problems.append(f"auto ({summary.get('platform_chose')}) is {1 - auto_vs_fixed:.1%} slower than the faster "
                        f"fixed precision (limit {AUTO_SLACK:.0%})")
    if over_encode < MIN_OVER_ENCODE:
        problems.append(f"the platform is {over_encode:.2f}x encode (limit {MIN_OVER_ENCODE}x)")
    print(f"bench-check on {summary['cpu']}: auto chose {summary.get('platform_chose')}; auto / faster fixed "
          f"precision {auto_vs_fixed:.3f} (fp32 {rate['platform_fp32']}, bf16 {rate['platform_bf16']}, "
          f"auto {rate['platform']}); platform / encode {over_encode:.2f}x")
    print("bench-check: " + ("FAILED: " + "; ".join(problems) if problems else "passed"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
