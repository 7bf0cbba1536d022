"""``infersim report``: a study table's plots and summary (``report/study_report.py``)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_report_parser(sub: Any) -> None:
    report = sub.add_parser("report", help="plots and a markdown summary of a study table written by "
                                           "infersim sweep")
    report.add_argument("study", help="the study: STUDY.parquet or STUDY.csv from infersim sweep")
    report.add_argument("--out", required=True, help="folder to write the PNGs, pareto_front.csv and "
                                                     "summary.md into")
    report.add_argument("--objectives", metavar="COL:DIR,COL:DIR",
                        help="the Pareto plot's two objectives, the first ranking the top plans "
                             "(default throughput_per_device:max,tokens_per_s_per_user:max; short "
                             "names as sweep --pareto, and per_user for 1 / TPOT)")
    report.add_argument("--heatmap", metavar="X,Y,COLUMN",
                        help="heat map of COLUMN over options X and Y (default batch,input_len,"
                             "throughput_tokens_per_s, or the two options with the most values)")
    report.add_argument("--top", type=int, default=5, help="plans in the summary's table (default 5; "
                                                           "the plots show at most 8)")
    report.add_argument("--json", action="store_true", help="print the written paths as JSON")


def cmd_report(args: argparse.Namespace) -> int:
    from simulator.report.study_report import write_report

    paths = write_report(args.study, args.out, objectives=args.objectives, heatmap=args.heatmap,
                         top=args.top)
    if args.json:
        print(json.dumps({kind: str(path) for kind, path in paths.items()}, indent=2))
        return 0
    print(f"wrote {len(paths)} files into {args.out}: "
          + ", ".join(path.name for path in paths.values()))
    return 0
