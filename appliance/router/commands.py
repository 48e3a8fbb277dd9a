"""``appliance report``: how much the specialists automate, and what each route costs.

Reads the decision rows of the escalation database (read-only; a running server may keep
writing). Over the window:

- automation rate: share of decisions the specialist answered alone (fallbacks included, and
  also counted on their own);
- escalation rate: share the generalist answered; the two add up to 1;
- per route: decisions, compute (core- and accelerator-seconds) and price, in total and per
  1,000 decisions;
- for one model (``appliance report NAME``), per version: the same rates and price, accuracy on
  the decisions reviewers corrected, lineage, and the shadow figures (:mod:`appliance.loop.report`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.config import state_dir
from appliance.errors import ApplianceError, InvalidArgument
from appliance.router.escalations import RouteTotals, Summary, summarize
from appliance.types import Route

DEFAULT_HOURS = 24.0
PER = 1000  # costs are shown per this many decisions


def default_db() -> Path:
    return state_dir("escalations") / "escalations.db"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "report", help="automation rate, escalation rate and cost per 1,000 decisions, per route"
    )
    window = parser.add_mutually_exclusive_group()
    window.add_argument("--since", metavar="ISO", help="start of the window, e.g. 2025-01-31T00:00:00Z")
    window.add_argument(
        "--hours", type=float, metavar="N", help=f"the last N hours (default: {DEFAULT_HOURS:g})"
    )
    parser.add_argument(
        "name", nargs="?", metavar="NAME", help="one model: also its versions, lineage and shadow figures"
    )
    parser.add_argument("--model", metavar="NAME", help="only this model's decisions (totals only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument(
        "--db",
        type=Path,
        metavar="PATH",
        help="escalation database (default: $APPLIANCE_HOME/escalations/escalations.db)",
    )
    parser.set_defaults(func=_report)


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; one without a zone is taken as UTC."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidArgument(
            f"--since {text!r} is not an ISO 8601 time such as 2025-01-31T00:00:00Z"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def build_report(summary: Summary, since: float, until: float, model: str | None) -> dict[str, Any]:
    total = summary.decisions
    specialist = summary.routes.get(Route.SPECIALIST.value, RouteTotals())
    generalist = summary.routes.get(Route.GENERALIST.value, RouteTotals())
    all_routes = RouteTotals(
        decisions=total,
        fallbacks=sum(r.fallbacks for r in summary.routes.values()),
        core_seconds=sum(r.core_seconds for r in summary.routes.values()),
        accelerator_seconds=sum(r.accelerator_seconds for r in summary.routes.values()),
        price=sum(r.price for r in summary.routes.values()),
    )
    return {
        "since": _iso(since),
        "until": _iso(until),
        "model": model,
        "decisions": total,
        "automation_rate": specialist.decisions / total if total else None,
        "escalation_rate": generalist.decisions / total if total else None,
        "fallbacks": all_routes.fallbacks,
        "currency": summary.currencies[0] if len(summary.currencies) == 1 else None,
        "routes": {
            route.value: _route_json(summary.routes.get(route.value, RouteTotals())) for route in Route
        },
        "total": _route_json(all_routes),
    }


def _route_json(totals: RouteTotals) -> dict[str, Any]:
    n = totals.decisions

    def per(value: float) -> float | None:
        return PER * value / n if n else None

    return {
        "decisions": n,
        "core_seconds": totals.core_seconds,
        "accelerator_seconds": totals.accelerator_seconds,
        "price": totals.price,
        f"core_seconds_per_{PER}": per(totals.core_seconds),
        f"accelerator_seconds_per_{PER}": per(totals.accelerator_seconds),
        f"price_per_{PER}": per(totals.price),
    }


def render(report: dict[str, Any]) -> str:
    def pct(rate: float | None) -> str:
        return "-" if rate is None else f"{100.0 * rate:.1f}%"

    def num(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    routes = report["routes"]
    currency = report["currency"] or "price"
    lines = [
        f"window      {report['since']} .. {report['until']}",
        f"model       {report['model'] or 'all'}",
        f"decisions   {report['decisions']}",
        f"automation  {pct(report['automation_rate'])}  ({routes['specialist']['decisions']} answered by "
        f"the specialist alone, {report['fallbacks']} of them fallbacks)",
        f"escalation  {pct(report['escalation_rate'])}  ({routes['generalist']['decisions']} answered by "
        "the generalist)",
        "",
        f"{'route':<11} {'decisions':>9} {'core-s/1k':>11} {'accel-s/1k':>11} {currency + '/1k':>12}",
    ]
    for name, row in [*routes.items(), ("all", report["total"])]:
        lines.append(
            f"{name:<11} {row['decisions']:>9} {num(row[f'core_seconds_per_{PER}'], 3):>11} "
            f"{num(row[f'accelerator_seconds_per_{PER}'], 3):>11} {num(row[f'price_per_{PER}'], 6):>12}"
        )
    return "\n".join(lines)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _report(args: argparse.Namespace) -> int:
    try:
        until = time.time()
        if args.since is not None:
            since = parse_time(args.since).timestamp()
        else:
            hours = DEFAULT_HOURS if args.hours is None else args.hours
            if not hours > 0:
                raise InvalidArgument(f"--hours must be positive, got {hours:g}")
            since = until - 3600.0 * hours
        if args.name and args.model and args.name != args.model:
            raise InvalidArgument(f"two models named: {args.name!r} and --model {args.model!r}")
        model = args.name or args.model
        summary = summarize(args.db or default_db(), since=since, until=until, model=model)
        if len(summary.currencies) > 1:
            raise InvalidArgument(
                f"the window mixes currencies {', '.join(summary.currencies)} (the price changed); narrow it"
            )
    except ApplianceError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    report = build_report(summary, since, until, model)
    if args.name:
        from appliance.config import appliance_home
        from appliance.loop.report import render_versions, version_report

        report["versions"] = version_report(model, args.db or default_db(), appliance_home(), since, until)
    if not args.name:
        from appliance.workflows import runs

        report["workflows"] = runs.summarize(runs.default_db(), since, until, args.db or default_db())
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(render(report))
        if args.name:
            print(render_versions(report["versions"], report["currency"] or "price"))
        elif report["workflows"]:
            print(runs.render(report["workflows"]))
    return 0
