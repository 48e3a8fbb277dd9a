"""``appliance gate``, ``shadow``, ``promote`` and ``rollback``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import ApplianceError, InvalidArgument
from appliance.factory.gate_rule import GateConfig, describe
from appliance.loop.gate import Verdict

if TYPE_CHECKING:
    from appliance.loop.promotion import Loader
    from appliance.store import ModelStore

DEFAULT_TRAFFIC_HOURS = 24.0 * 7
_DEFAULTS = GateConfig()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gate = sub.add_parser(
        "gate",
        help="score a challenger against the champion on the golden set and recent corrections",
        description=(
            f"Passes when, {describe(_DEFAULTS)}. Defaults come from $APPLIANCE_HOME/loop/policy.json "
            "when present. The verdict is recorded beside the version."
        ),
    )
    gate.add_argument("model", help="the challenger, NAME:VERSION")
    gate.add_argument("--champion", type=int, help="the version to beat (default: the serving one)")
    gate.add_argument("--golden", type=Path, help="a labelled file (default: the dataset store's golden set)")
    gate.add_argument("--text-column", help="of --golden (default: the champion's training columns)")
    gate.add_argument("--label-column", help="of --golden (default: the champion's training columns)")
    gate.add_argument("--traffic-hours", type=float, default=DEFAULT_TRAFFIC_HOURS, metavar="H")
    gate.add_argument("--db", type=Path, help="escalation database with the corrections")
    gate.add_argument("--max-drop-points", type=float, help="accuracy the challenger may lose, in points")
    gate.add_argument("--min-coverage-gain-points", type=float, help="coverage it must gain (may be < 0)")
    gate.add_argument("--target-precision", type=float)
    gate.add_argument("--alpha", type=float, help="significance level of the paired test")
    gate.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    gate.add_argument("--address", help="host:port of the appliance, for auto-promotion")
    gate.set_defaults(func=run_gate)

    shadow = sub.add_parser("shadow", help="run a challenger in shadow on a share of live traffic")
    shadow.add_argument("model", help="NAME:VERSION to shadow (NAME with --off)")
    shadow.add_argument("--fraction", type=float, help="share of requests, in (0, 1]")
    shadow.add_argument("--off", action="store_true", help="stop shadowing this model")
    shadow.set_defaults(func=run_shadow)

    promote = sub.add_parser("promote", help="serve a gated version on every replica (scope admin)")
    promote.add_argument("model", help="NAME:VERSION")
    promote.add_argument("--force", action="store_true", help="promote without a passing gate verdict")
    promote.add_argument("--address", help="host:port (default: the local appliance)")
    promote.set_defaults(func=run_promote)

    rollback = sub.add_parser("rollback", help="serve the previous champion again (scope admin)")
    rollback.add_argument("model", help="NAME")
    rollback.add_argument("--address", help="host:port (default: the local appliance)")
    rollback.set_defaults(func=run_rollback)


def _fail(exc: ApplianceError | OSError) -> int:
    print(f"error: {exc.message if isinstance(exc, ApplianceError) else exc}", file=sys.stderr)
    return 1


def _exact(ref: str) -> tuple[str, int]:
    from appliance.store import parse_ref

    name, version = parse_ref(ref)
    if version is None:
        raise InvalidArgument(f"{ref!r}: name the version, as NAME:VERSION")
    return name, version


def _config(ns: argparse.Namespace, base: GateConfig) -> GateConfig:
    overrides = {
        "max_accuracy_drop_points": ns.max_drop_points,
        "min_coverage_gain_points": ns.min_coverage_gain_points,
        "target_precision": ns.target_precision,
        "alpha": ns.alpha,
    }
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def champion_of(store: ModelStore, name: str, challenger: int) -> int:
    """The serving version, else the newest version below the challenger."""
    from appliance.errors import FailedPrecondition

    serving = store.serving_version(name)
    if serving is not None and serving != challenger and serving in store.versions(name):
        return serving
    older = [v for v in store.versions(name) if v < challenger]
    if not older:
        raise FailedPrecondition(f"{name}:{challenger} has no champion to be compared with")
    return older[-1]


def _loader(address: str | None) -> Loader:
    """AdminService.LoadModel over one connection; a refusal is FailedPrecondition with its status."""
    import grpc

    from appliance.client import Client, Connection

    def load(ref: str) -> int:
        with Client(Connection.discover(address)) as client:
            try:
                return int(client.load_model(ref).previous_version)
            except grpc.RpcError as exc:
                from appliance.errors import FailedPrecondition

                raise FailedPrecondition(
                    f"the appliance refused {ref} ({exc.code().name}: {exc.details()}); "
                    "what was serving keeps serving"
                ) from exc

    return load


def run_gate(ns: argparse.Namespace) -> int:
    from appliance.config import appliance_home
    from appliance.engines.specialist import load_specialist
    from appliance.loop import sources
    from appliance.loop.gate import judge, manifest_sha256, save_verdict
    from appliance.loop.promotion import LoopPolicy, promote
    from appliance.router.commands import default_db
    from appliance.store import ModelStore

    try:
        home = appliance_home()
        policy = LoopPolicy.read(home)
        config = _config(ns, policy.gate)
        store = ModelStore(home)
        name, version = _exact(ns.model)
        store.resolve(ns.model)
        champion = ns.champion or champion_of(store, name, version)
        store.resolve(f"{name}:{champion}")
        champ = load_specialist(f"{name}:{champion}", store)
        challenger = load_specialist(ns.model, store)
        if ns.golden is not None:
            columns = champ.spec.columns
            text = ns.text_column or (columns.text if columns else "text")
            label = ns.label_column or (columns.label if columns else "label")
            golden = sources.golden_from_file(ns.golden, text, label)
        else:
            golden = sources.golden_from_store(home, champ.spec, challenger.spec)
        traffic = sources.corrected_traffic(ns.db or default_db(), name, ns.traffic_hours)
        verdict = judge(
            name,
            (champion, version),
            (sources.SpecialistPredictor(champ), sources.SpecialistPredictor(challenger)),
            golden,
            traffic,
            config,
            manifest_sha256(store, name, version),
        )
        path = save_verdict(store, verdict)
        promoted = None
        if verdict.passed and policy.auto_promote:
            promote(store, name, version, _loader(ns.address))
            promoted = f"{name}:{version}"
    except (ApplianceError, OSError) as exc:
        return _fail(exc)
    except Exception as exc:  # the data reader's located errors
        from appliance.dataset import DataError

        if isinstance(exc, DataError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
    if ns.json:
        print(json.dumps({**verdict.to_dict(), "recorded": str(path), "promoted": promoted}, sort_keys=True))
    else:
        print(render_verdict(verdict))
        print(f"recorded  {path}" + (f"\npromoted  {promoted} (auto_promote)" if promoted else ""))
    return 0 if verdict.passed else 2


def render_verdict(v: Verdict) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.2f}%"

    lines = [
        f"{v.model}: challenger {v.challenger_version} vs champion {v.champion_version}: "
        + ("PASS" if v.passed else "REFUSED"),
        "",
        f"{'set':<34} {'n':>6} {'acc champ':>10} {'acc chall':>10} {'cov champ':>10} {'cov chall':>10} "
        f"{'prec chall':>10} {'b':>5} {'c':>5} {'mid-p':>8}",
    ]
    for comparison in (v.golden, v.traffic):
        if comparison is None:
            continue
        t = comparison.test
        lines.append(
            f"{comparison.source[:34]:<34} {comparison.n:>6} {pct(comparison.champion.accuracy):>10} "
            f"{pct(comparison.challenger.accuracy):>10} {pct(comparison.champion.coverage):>10} "
            f"{pct(comparison.challenger.coverage):>10} {pct(comparison.challenger.precision):>10} "
            f"{t.b:>5} {t.c:>5} {t.p_mid:>8.4f}"
        )
    lines.append("")
    lines.append(
        f"coverage: the share at or above each version's threshold ({v.golden.champion.threshold_source}, "
        f"target precision {v.config.target_precision:g}); the gate reads the golden set only"
    )
    for check in v.checks:
        lines.append(f"{'ok  ' if check.passed else 'FAIL'} {check.name:<9} {check.detail}")
    return "\n".join(lines)


def run_shadow(ns: argparse.Namespace) -> int:
    from appliance.loop.choices import ShadowChoice, set_shadow
    from appliance.store import ModelStore, parse_ref

    try:
        store = ModelStore()
        if ns.off:
            name, _ = parse_ref(ns.model)
            set_shadow(store, name, None)
            print(f"shadow off for {name}")
            return 0
        name, version = _exact(ns.model)
        store.resolve(ns.model)
        if ns.fraction is None:
            raise InvalidArgument("give --fraction F (0 < F <= 1), or --off")
        set_shadow(store, name, ShadowChoice(version, ns.fraction))
    except (ApplianceError, OSError) as exc:
        return _fail(exc)
    print(f"shadow {name}:{version} on {100 * ns.fraction:g}% of requests (replicas follow within seconds)")
    return 0


def run_promote(ns: argparse.Namespace) -> int:
    from appliance.loop.promotion import promote
    from appliance.store import ModelStore

    try:
        store = ModelStore()
        name, version = _exact(ns.model)
        store.resolve(ns.model)
        previous = promote(store, name, version, _loader(ns.address), force=ns.force)
    except (ApplianceError, OSError, ConnectionError) as exc:
        return _fail(exc)
    print(f"serving {name}:{version} (was {previous or 'none'})" + (" [forced]" if ns.force else ""))
    return 0


def run_rollback(ns: argparse.Namespace) -> int:
    from appliance.loop.promotion import rollback
    from appliance.store import ModelStore, validate_name

    try:
        store = ModelStore()
        name = validate_name(ns.model)
        now, was = rollback(store, name, _loader(ns.address))
    except (ApplianceError, OSError, ConnectionError) as exc:
        return _fail(exc)
    print(f"serving {name}:{now} (was {was or 'none'})")
    return 0
