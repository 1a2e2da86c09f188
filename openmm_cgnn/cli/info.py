"""``openmm-cgnn info``: versions, OpenMM platforms (and whether each starts here), plugin load failures."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from ..platforms import info, info_report

    data = info()
    print(json.dumps(data, indent=2) if args.json else info_report(data))
    return 0
