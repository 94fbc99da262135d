"""The `frys` command line: parses arguments, calls runtime, storage and config, sets exit codes.

Exit codes: 0 ok, 1 failure, 2 usage or config error. Heavy modules are imported inside the
commands so `frys --version` starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from frys_edge import __version__

if TYPE_CHECKING:
    from frys_edge.config import LoadedConfig
    from frys_edge.storage import Storage

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

MAIN_HELP = """\
Frys Edge: an embedded edge runtime.

examples:
  frys run                          run on defaults, state in ./data
  frys run -c frys.toml             run with a config file
  frys config check frys.toml       validate a config file
  frys kv put -c frys.toml greeting '"hello"'
  frys db backup /mnt/usb/frys.db   consistent snapshot of the database

Every command that opens the data dir takes -c/--config FILE and --data-dir DIR and honours
FRYS_SYSTEM_DATA_DIR. Exit codes: 0 ok, 1 failure, 2 usage or config error.
"""


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help="TOML config file")
    p.add_argument("--data-dir", metavar="DIR", help="data dir (overrides [system] data_dir)")


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree, with an example in each command's help."""
    parser = _Parser(prog="frys", description=MAIN_HELP)
    parser.add_argument("--version", action="version", version=f"frys {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run the runtime until SIGTERM or SIGINT",
        description="Run the runtime until SIGTERM or SIGINT (drains gracefully; a second "
        "signal exits at once). SIGHUP reloads the config file.\n\n"
        "example:\n  frys run -c frys.toml --log-level debug",
    )
    _config_flags(run)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["text", "json"])
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="check or show configuration")
    csub = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = csub.add_parser(
        "check",
        help="validate a config file",
        description="Validate a config file together with FRYS_* variables; exit 0 when "
        "valid, 2 listing every problem when not.\n\nexample:\n  frys config check frys.toml",
    )
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_config_check)
    show = csub.add_parser(
        "show",
        help="print the effective config and where each value came from",
        description="Print every effective value and its source (default, file, env, "
        "flag).\n\nexample:\n  FRYS_NETWORK_PORT=9000 frys config show -c frys.toml",
    )
    _config_flags(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML-ish text")
    show.set_defaults(func=cmd_config_show)

    kv = sub.add_parser("kv", help="read and write the key-value store")
    ksub = kv.add_subparsers(dest="action", metavar="ACTION", required=True)
    kv_examples = {
        "get": "frys kv get -c frys.toml greeting",
        "put": "frys kv put -c frys.toml greeting '\"hello\"'   (VALUE is JSON, else a string)",
        "delete": "frys kv delete -c frys.toml greeting",
        "list": "frys kv list -c frys.toml sensor/   (keys starting with sensor/)",
    }
    for action, example in kv_examples.items():
        p = ksub.add_parser(
            action,
            help=f"{action} keys",
            description=f"example:\n  {example}",
        )
        _config_flags(p)
        p.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")
        if action == "list":
            p.add_argument("prefix", nargs="?", default="", metavar="PREFIX")
            p.add_argument("--limit", type=int, default=1000)
        else:
            p.add_argument("key", metavar="KEY")
        if action == "put":
            p.add_argument("value", metavar="VALUE")
            p.add_argument("--string", action="store_true", help="store VALUE as a string as is")
        p.set_defaults(func=cmd_kv)

    db = sub.add_parser("db", help="check or back up the database")
    dsub = db.add_subparsers(dest="action", metavar="ACTION", required=True)
    dcheck = dsub.add_parser(
        "check",
        help="run SQLite's integrity check",
        description="Run PRAGMA integrity_check on the data dir's database; exit 0 when "
        "sound, 1 listing the damage.\n\nexample:\n  frys db check -c frys.toml",
    )
    _config_flags(dcheck)
    dcheck.set_defaults(func=cmd_db_check)
    backup = dsub.add_parser(
        "backup",
        help="write a consistent snapshot with the SQLite backup API",
        description="Write a consistent snapshot (safe while `frys run` is running).\n\n"
        "example:\n  frys db backup -c frys.toml /mnt/usb/frys-backup.db",
    )
    _config_flags(backup)
    backup.add_argument("path", metavar="PATH")
    backup.set_defaults(func=cmd_db_backup)

    health = sub.add_parser(
        "health",
        help="probe a running `frys run` on its health port (for container health checks)",
        description="GET /health (or /health/ready) from the `frys run` that the same config "
        "describes ([network] host and health_port; 0.0.0.0 and :: are probed on loopback). "
        "Exit 0 when it answers ok, degraded or starting (or ready), 1 when it answers failed "
        "or 503 or cannot be reached; the status goes to stdout.\n\n"
        "example:\n  frys health -c frys.toml --ready\n"
        '  HEALTHCHECK CMD ["/frys", "health"]   (in a Dockerfile)',
    )
    _config_flags(health)
    health.add_argument("--ready", action="store_true", help="probe /health/ready instead")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default: 5)")
    health.set_defaults(func=cmd_health)

    _workflow_parsers(sub)
    _plugin_parsers(sub)
    _vector_parsers(sub)

    bench = sub.add_parser(
        "bench",
        help="run the benchmarks and print the table",
        description="Measure scheduler, bus, pool, storage and start-up (or, with "
        "--workflows, the workflow engine) against floors measured in the same run.\n\n"
        "example:\n  frys bench --json results.json\n  frys bench --workflows --quick",
    )
    suite = bench.add_mutually_exclusive_group()
    suite.add_argument("--workflows", action="store_true", help="the workflow engine suite")
    suite.add_argument("--plugins", action="store_true", help="the WASM plugin sandbox suite")
    suite.add_argument("--vectors", action="store_true", help="the vector search suite")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--quick", action="store_true", help="fewer iterations")
    bench.set_defaults(func=cmd_bench)
    return parser


def _workflow_parsers(sub: Any) -> None:
    wf = sub.add_parser("workflow", help="validate, run and inspect workflows (no server needed)")
    wsub = wf.add_subparsers(dest="action", metavar="ACTION", required=True)
    validate = wsub.add_parser(
        "validate",
        help="check workflow definition files",
        description="Validate definitions (YAML, JSON or TOML); exit 0 when all are valid, 2 "
        "listing every problem with its line. With -c, the config's native plugins run their "
        "init so the actions they add are known.\n\nexample:\n"
        "  frys workflow validate -c examples/gateway/frys.toml examples/gateway/workflows/*",
    )
    _config_flags(validate)
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(func=cmd_workflow_validate)

    wlist = wsub.add_parser(
        "list",
        help="list the definitions in [workflows] dir",
        description="List the workflow definitions `frys run` would load from [workflows] "
        "dir, with their triggers, or the problems that keep one from loading.\n\n"
        "example:\n  frys workflow list -c examples/gateway/frys.toml",
    )
    _config_flags(wlist)
    wlist.add_argument("--json", action="store_true", help="print a JSON list")
    wlist.set_defaults(func=cmd_workflow_list)

    run = wsub.add_parser(
        "run",
        help="start a run (and wait for it with --wait)",
        description="Start a run of a definition FILE or of a workflow NAME from [workflows] "
        "dir. Without --wait the run is stored and continues at the next `frys run`. With "
        "--wait, print the final status; exit 0 only if it succeeded.\n\nexample:\n"
        "  frys workflow run examples/workflows/diamond.yaml --input reading=42 --wait --json",
    )
    _config_flags(run)
    run.add_argument("workflow", metavar="FILE|NAME")
    run.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an input (VALUE is JSON, else a string); repeat for more",
    )
    run.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="a run with this key already stored is returned instead",
    )
    run.add_argument("--wait", action="store_true", help="wait for the run to finish")
    run.add_argument("--json", action="store_true", help="print the run as JSON")
    run.set_defaults(func=cmd_workflow_run)

    runs = wsub.add_parser(
        "runs",
        help="list runs, newest first",
        description="List runs, newest first.\n\nexample:\n"
        "  frys workflow runs --status failed --json",
    )
    _config_flags(runs)
    runs.add_argument("--status", choices=["running", "succeeded", "failed", "cancelled"])
    runs.add_argument("--workflow", metavar="NAME")
    runs.add_argument("--limit", type=int, default=50)
    runs.add_argument("--json", action="store_true", help="print a JSON list of runs")
    runs.set_defaults(func=cmd_workflow_runs)

    show = wsub.add_parser(
        "show",
        help="show one run with its steps",
        description="Show a run: status, inputs, outputs, and each step's attempts, timings, "
        "output and error.\n\nexample:\n  frys workflow show 3f2a... --json",
    )
    _config_flags(show)
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument("--json", action="store_true", help="print the run as JSON")
    show.set_defaults(func=cmd_workflow_show)

    cancel = wsub.add_parser(
        "cancel",
        help="cancel a run that has not finished",
        description="Mark a stored run cancelled (when no `frys run` holds the data dir).\n\n"
        "example:\n  frys workflow cancel 3f2a...",
    )
    _config_flags(cancel)
    cancel.add_argument("run_id", metavar="RUN_ID")
    cancel.set_defaults(func=cmd_workflow_cancel)


def _plugin_parsers(sub: Any) -> None:
    plugin = sub.add_parser("plugin", help="check, call and list WASM plugins")
    psub = plugin.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = psub.add_parser(
        "check",
        help="check plugin dirs: manifest, hash, module, imports, grants",
        description="Check each plugin dir: the manifest, the module's sha256, that it "
        "compiles, that it imports only the ABI, and which asked-for capabilities the "
        "config grants. Exit 0 when all load, 2 naming the reason when one does not.\n\n"
        "example:\n  frys plugin check plugins/anomaly plugins/hello",
    )
    _config_flags(check)
    check.add_argument("dirs", nargs="+", metavar="DIR")
    check.set_defaults(func=cmd_plugin_check)
    call = psub.add_parser(
        "call",
        help="call one export of a plugin dir",
        description="Load a plugin dir with the config's grants and call an export with a "
        "JSON input; print the JSON output.\n\nexample:\n"
        "  frys plugin call plugins/anomaly detect --input '{\"values\": [1, 2, 30]}'",
    )
    _config_flags(call)
    call.add_argument("dir", metavar="DIR")
    call.add_argument("export", metavar="EXPORT")
    call.add_argument("--input", default="null", metavar="JSON", help="the input (JSON)")
    call.set_defaults(func=cmd_plugin_call)
    plist = psub.add_parser(
        "list",
        help="list the plugins under [plugins] paths",
        description="List the WASM plugins under [plugins] paths with their exports and "
        "grants.\n\nexample:\n  frys plugin list -c frys.toml",
    )
    _config_flags(plist)
    plist.set_defaults(func=cmd_plugin_list)
    keygen = psub.add_parser(
        "keygen",
        help="make an ed25519 signing key",
        description="Write a new ed25519 private key to FILE (mode 600) and print its public "
        "key, for [plugins] trusted_keys.\n\nexample:\n  frys plugin keygen ~/.frys/signing.key",
    )
    keygen.add_argument("file", metavar="FILE")
    keygen.set_defaults(func=cmd_plugin_keygen)
    sign = psub.add_parser(
        "sign",
        help="sign a plugin dir's module",
        description="Sign the module's sha256 with a key from `frys plugin keygen` and write "
        "the signature into the manifest.\n\nexample:\n"
        "  frys plugin sign plugins/anomaly --key ~/.frys/signing.key",
    )
    sign.add_argument("dir", metavar="DIR")
    sign.add_argument("--key", required=True, metavar="FILE", help="the private key file")
    sign.set_defaults(func=cmd_plugin_sign)


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    flags = {
        "data_dir": "system.data_dir",
        "log_level": "system.log_level",
        "log_format": "system.log_format",
    }
    return {key: v for flag, key in flags.items() if (v := getattr(args, flag, None)) is not None}


def _load(args: argparse.Namespace) -> LoadedConfig:
    from frys_edge.config import load_config

    return load_config(getattr(args, "config", None), overrides=_overrides(args))


def _open_storage(args: argparse.Namespace, readonly: bool) -> Storage:
    from frys_edge.storage import Storage

    cfg = _load(args).config
    return Storage(
        cfg.system.data_dir,
        sync=cfg.storage.sync,
        busy_timeout=cfg.storage.busy_timeout,
        readonly=readonly,
    )


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from frys_edge.api import ApiError, ApiServer, check_bind_security
    from frys_edge.runtime import Runtime, configure_logging, serve

    loaded = _load(args)
    configure_logging(loaded.config.system.log_level, loaded.config.system.log_format)
    try:
        check_bind_security(loaded.config)
    except ApiError as e:
        print(f"frys: {e}", file=sys.stderr)
        return EXIT_USAGE
    rt = Runtime(loaded, overrides=_overrides(args))
    server = ApiServer(rt)

    async def main() -> int:
        # Bound before the runtime starts, so a port in use fails fast and cleanly.
        ports = await server.bind()
        async with anyio.create_task_group() as tg:

            def ready() -> None:
                tg.start_soon(server.serve)
                host = loaded.config.network.host
                print(
                    f"frys {__version__} running, data dir {loaded.config.system.data_dir}, "
                    f"API http://{host}:{ports['api']}, health http://{host}:{ports['health']};"
                    " stop with Ctrl-C or SIGTERM",
                    file=sys.stderr,
                    flush=True,
                )

            code = await serve(rt, ready, before_stop=server.stop)
        return code

    return anyio.run(main)


def cmd_health(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    net = _load(args).config.network
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(net.host, net.host)
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{net.health_port}/health{'/ready' if args.ready else ''}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as e:
        print(f"frys: {url}: HTTP {e.code} {e.read().decode(errors='replace')}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, ValueError) as e:
        print(f"frys: {url}: {e}; is `frys run` running with this config?", file=sys.stderr)
        return EXIT_FAILURE
    status = "ready" if args.ready else str(body.get("status"))
    print(f"{url}: {status}")
    # /health answers 200 whatever the state; a failed component is a failed probe.
    return EXIT_OK if status in ("ready", "ok", "degraded", "starting") else EXIT_FAILURE


def cmd_config_check(args: argparse.Namespace) -> int:
    from frys_edge.config import load_config

    load_config(args.file)
    print(f"{args.file}: ok")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    from frys_edge.config import config_items, display_value

    loaded = _load(args)
    items = config_items(loaded.config)
    if args.json:
        out = {k: {"value": display_value(k, v), "source": loaded.sources[k]} for k, v in items}
        print(json.dumps(out, indent=2))
        return EXIT_OK
    section = None
    for key, value in items:
        head, _, name = key.partition(".")
        if head != section:
            print(f"{'' if section is None else chr(10)}[{head}]")
            section = head
        print(f"{name} = {display_value(key, value)}  # {loaded.sources[key]}")
    return EXIT_OK


def cmd_kv(args: argparse.Namespace) -> int:
    import anyio

    ns = args.namespace
    if args.action in ("get", "list"):
        with _open_storage(args, readonly=True) as store:
            if args.action == "get":
                entry = store.get(ns, args.key)
                if entry is None:
                    print(f"frys: no key {args.key!r} in namespace {ns!r}", file=sys.stderr)
                    return EXIT_FAILURE
                print(json.dumps(entry.value))
            else:
                for entry in store.list_prefix(ns, args.prefix, limit=args.limit):
                    print(f"{entry.key}\t{json.dumps(entry.value)}")
        return EXIT_OK
    with _open_storage(args, readonly=False) as store:
        if args.action == "put":
            value: Any = args.value
            if not args.string:
                try:
                    value = json.loads(args.value)
                except ValueError:
                    value = args.value
            version = anyio.run(store.put, ns, args.key, value)
            print(f"{args.key} = {json.dumps(value)} (version {version})")
            return EXIT_OK
        existed = anyio.run(store.delete, ns, args.key)
        if not existed:
            print(f"frys: no key {args.key!r} in namespace {ns!r}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"deleted {args.key}")
        return EXIT_OK


def cmd_db_check(args: argparse.Namespace) -> int:
    with _open_storage(args, readonly=True) as store:
        problems = store.check()
    if problems == ["ok"]:
        print(f"{store.path}: ok")
        return EXIT_OK
    print(f"{store.path}: integrity check found {len(problems)} problem(s):")
    for line in problems:
        print(f"  {line}")
    print("restore the file from a backup (frys db backup makes them)")
    return EXIT_FAILURE


def cmd_db_backup(args: argparse.Namespace) -> int:
    with _open_storage(args, readonly=True) as store:
        dest = store.backup(args.path)
    print(f"backed up {store.path} to {dest}")
    return EXIT_OK


def run_document(run: Any, steps: list[Any], attempts: list[Any]) -> dict[str, Any]:
    """The stable JSON shape of a run, shared by `run --json` and `show --json`."""
    history: dict[str, list[dict[str, Any]]] = {}
    for a in attempts:  # failed attempts; a success is the step's own row
        entry = {"attempt": a.attempt, "status": a.status, "error": a.error}
        entry |= {"started_at": a.started_at, "finished_at": a.finished_at}
        history.setdefault(a.step, []).append(entry)
    for s in steps:
        if s.status == "succeeded":
            entry = {"attempt": s.attempts, "status": s.status, "error": None}
            entry |= {"started_at": s.started_at, "finished_at": s.finished_at}
            history.setdefault(s.name, []).append(entry)
    return {
        "id": run.id,
        "workflow": run.workflow,
        "status": run.status,
        "inputs": run.inputs,
        "outputs": run.outputs,
        "error": run.error,
        "idempotency_key": run.idempotency_key,
        "created_at": run.created_at,
        "finished_at": run.finished_at,
        "steps": [
            {
                "name": s.name,
                "status": s.status,
                "attempts": s.attempts,
                "output": s.output,
                "error": s.error,
                "started_at": s.started_at,
                "finished_at": s.finished_at,
                "wake_at": s.wake_at,
                "history": history.get(s.name, []),
            }
            for s in steps
        ],
    }


def _print_run(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    print(f"run {doc['id']} of {doc['workflow']}: {doc['status']}")
    if doc["error"]:
        print(f"  error: {doc['error']}")
    for step in doc["steps"]:
        line = f"  {step['name']}: {step['status']} ({step['attempts']} attempts)"
        if step["error"]:
            line += f" - {step['error']}"
        print(line)
        for attempt in step["history"]:
            if attempt["status"] != "succeeded":
                print(f"    attempt {attempt['attempt']}: {attempt['status']}: {attempt['error']}")
    if doc["outputs"] is not None:
        print(f"  outputs: {json.dumps(doc['outputs'])}")


def _plugin_actions(args: argparse.Namespace) -> Any:
    """A runtime (not started) whose native plugins have run init, so their actions exist."""
    import anyio

    from frys_edge.runtime import NativePlugin, Runtime, resolve_plugin

    rt = Runtime(_load(args))
    for spec in rt.config.plugins.native if args.config else ():
        anyio.run(NativePlugin(*resolve_plugin(spec)).call, "init", rt)
    return rt


def cmd_workflow_list(args: argparse.Namespace) -> int:
    from pathlib import Path

    from frys_edge.workflow import WorkflowError, load_workflow

    rt = _plugin_actions(args)
    directory = Path(rt.config.workflows.dir)
    if not directory.is_dir():
        print(f"frys: no workflows dir {directory}; set [workflows] dir", file=sys.stderr)
        return EXIT_FAILURE
    rows: list[dict[str, Any]] = []
    for path in sorted(directory.iterdir()):
        if path.suffix not in (".yaml", ".yml", ".json", ".toml"):
            continue
        try:
            spec = load_workflow(str(path), rt.engine.actions).spec
        except WorkflowError as e:
            rows.append({"file": str(path), "name": None, "error": str(e)})
            continue
        triggers = [t.type + (f" {t.topic or t.every or t.cron}") for t in spec.triggers]
        rows.append(
            {
                "file": str(path),
                "name": spec.name,
                "steps": len(spec.steps),
                "triggers": triggers,
                "error": None,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        if row["error"]:
            print(f"{row['file']}: INVALID\n  {row['error']}")
        else:
            trig = ", ".join(row["triggers"]) or "no triggers"
            print(f"{row['name']}  {row['steps']} steps  {trig}  ({row['file']})")
    return EXIT_OK


def cmd_workflow_validate(args: argparse.Namespace) -> int:
    from frys_edge.workflow import WorkflowError, load_workflow

    rt = _plugin_actions(args)
    failed = False
    for path in args.files:
        try:
            load_workflow(path, rt.engine.actions)
        except WorkflowError as e:
            print(f"frys: {e}", file=sys.stderr)
            failed = True
        else:
            print(f"{path}: ok")
    return EXIT_USAGE if failed else EXIT_OK


def cmd_workflow_run(args: argparse.Namespace) -> int:
    import anyio

    from frys_edge.runtime import Runtime, configure_logging
    from frys_edge.workflow import DefinitionError, WorkflowError, parse_input_pair

    loaded = _load(args)
    configure_logging(loaded.config.system.log_level, loaded.config.system.log_format)
    try:
        inputs = dict(parse_input_pair(text) for text in args.input)
    except WorkflowError as e:
        print(f"frys: {e}", file=sys.stderr)
        return EXIT_USAGE

    async def main() -> int:
        async with Runtime(loaded, overrides=_overrides(args)) as rt:
            engine = rt.engine
            target = engine.load(args.workflow) if _is_file(args.workflow) else args.workflow
            run_id = await engine.start(target, inputs, idempotency_key=args.idempotency_key)
            if not args.wait:
                print(run_id)
                return EXIT_OK
            run = await engine.wait(run_id)
            assert rt.storage is not None
            steps, attempts = rt.storage.run_steps(run_id), rt.storage.run_attempts(run_id)
            _print_run(run_document(run, steps, attempts), args.json)
            return EXIT_OK if run.status == "succeeded" else EXIT_FAILURE

    try:
        return anyio.run(main)
    except DefinitionError as e:
        print(f"frys: {e}", file=sys.stderr)
        return EXIT_USAGE


def _is_file(target: str) -> bool:
    from pathlib import Path

    return Path(target).is_file()


def cmd_workflow_runs(args: argparse.Namespace) -> int:
    with _open_storage(args, readonly=True) as store:
        runs = store.list_runs(status=args.status, workflow=args.workflow, limit=args.limit)
        if args.json:
            docs = [run_document(run, [], []) | {"steps": None} for run in runs]
            print(json.dumps(docs, indent=2))
            return EXIT_OK
        for run in runs:
            print(f"{run.id}  {run.workflow}  {run.status}  {run.error or ''}".rstrip())
    return EXIT_OK


def cmd_workflow_show(args: argparse.Namespace) -> int:
    with _open_storage(args, readonly=True) as store:
        run = store.get_run(args.run_id)
        if run is None:
            print(
                f"frys: no run {args.run_id!r}; list them with `frys workflow runs`",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        _print_run(
            run_document(run, store.run_steps(run.id), store.run_attempts(run.id)), args.json
        )
    return EXIT_OK


def cmd_workflow_cancel(args: argparse.Namespace) -> int:
    import anyio

    with _open_storage(args, readonly=False) as store:
        run = store.get_run(args.run_id)
        if run is None:
            print(
                f"frys: no run {args.run_id!r}; list them with `frys workflow runs`",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        if not anyio.run(store.end_run, run.id, "cancelled", None, "cancelled"):
            print(f"frys: run {run.id} already {run.status}", file=sys.stderr)
            return EXIT_FAILURE
    print(f"cancelled {run.id}")
    return EXIT_OK


def _load_plugin_dir(args: argparse.Namespace, directory: str) -> Any:
    """Load a plugin dir as the runtime would: its grant and the signature settings."""
    from pathlib import Path

    from frys_edge.sandbox import load_plugin, read_manifest

    plugins = _load(args).config.plugins
    manifest = read_manifest(Path(directory))
    return load_plugin(
        directory,
        _grant_for(args, manifest.name),
        pool_size=1,
        trusted_keys=plugins.trusted_keys,
        require_signature=plugins.require_signature,
    )


def _grant_for(args: argparse.Namespace, name: str) -> Any:
    import msgspec

    from frys_edge.sandbox import Grant

    granted = _load(args).config.plugins.grants.get(name)
    return Grant() if granted is None else msgspec.convert(granted, Grant, from_attributes=True)


def cmd_plugin_check(args: argparse.Namespace) -> int:
    from frys_edge.sandbox import PluginError

    failed = False
    for directory in args.dirs:
        try:
            plugin = _load_plugin_dir(args, directory)
            manifest = plugin.manifest
        except PluginError as e:
            print(f"frys: {e}", file=sys.stderr)
            failed = True
            continue
        denied = sorted(set(manifest.capabilities) - plugin.granted)
        exports = ", ".join(plugin.exports) or "_start (WASI command)"
        line = f"{directory}: ok: {manifest.name} {manifest.version}, exports {exports}"
        if denied:
            line += f"; not granted: {', '.join(denied)} (calls using them will fail)"
        print(line)
    return EXIT_USAGE if failed else EXIT_OK


def cmd_plugin_call(args: argparse.Namespace) -> int:
    try:
        value = json.loads(args.input)
    except ValueError as e:
        print(f"frys: --input is not JSON: {e}", file=sys.stderr)
        return EXIT_USAGE
    plugin = _load_plugin_dir(args, args.dir)
    print(json.dumps(plugin.call(args.export, value)))
    return EXIT_OK


def cmd_plugin_list(args: argparse.Namespace) -> int:
    from pathlib import Path

    from frys_edge.sandbox import PluginError, read_manifest

    config = _load(args).config
    for root in config.plugins.paths:
        for path in sorted(Path(root).glob("*/frys-plugin.toml")):
            try:
                manifest = read_manifest(path.parent)
            except PluginError as e:
                print(f"{path.parent}: INVALID: {e}")
                continue
            grant = config.plugins.grants.get(manifest.name)
            granted = ", ".join(grant.capabilities) if grant else "nothing"
            exports = ", ".join(e.name for e in manifest.exports) or "_start"
            print(
                f"{manifest.name} {manifest.version} ({path.parent}): exports {exports}; "
                f"granted {granted}"
            )
    return EXIT_OK


def cmd_plugin_keygen(args: argparse.Namespace) -> int:
    import base64
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"frys: {args.file} exists; refusing to overwrite a key", file=sys.stderr)
        return EXIT_FAILURE
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(raw).decode() + "\n")
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    print(base64.b64encode(public).decode())
    return EXIT_OK


def cmd_plugin_sign(args: argparse.Namespace) -> int:
    import base64
    import hashlib
    import re
    from pathlib import Path

    from cryptography.hazmat.primitives.asymmetric import ed25519

    from frys_edge.sandbox import MANIFEST, read_manifest

    directory = Path(args.dir)
    manifest = read_manifest(directory)
    digest = hashlib.sha256((directory / manifest.module).read_bytes()).hexdigest()
    if digest != manifest.sha256:
        print(
            f"frys: {directory / manifest.module} does not match the manifest's sha256; "
            "fix the manifest before signing",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    raw = base64.b64decode(Path(args.key).read_text().strip())
    signature = base64.b64encode(
        ed25519.Ed25519PrivateKey.from_private_bytes(raw).sign(digest.encode())
    ).decode()
    path = directory / MANIFEST
    text = re.sub(r"(?m)^signature\s*=.*\n", "", path.read_text())
    text = re.sub(r"(?m)^(sha256\s*=.*\n)", rf'\1signature = "{signature}"\n', text, count=1)
    path.write_text(text)
    print(f"signed {directory} ({manifest.name} {manifest.version})")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    if getattr(sys, "frozen", False) and not args.plugins:
        # The static binary: these suites start `python -c` children or race numpy.
        print(
            "frys: this benchmark suite needs a Python install (it starts Python processes "
            "or compares against numpy, which the static binary does not carry); run it from "
            "the wheel: pip install 'frys-edge[plugins,vectors]'. Here, `frys bench --plugins` "
            "runs.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.vectors:
        from frys_edge.bench_vectors import run_vector_benchmarks

        return run_vector_benchmarks(json_path=args.json, quick=args.quick)
    if args.plugins:
        from frys_edge.bench_plugins import run_plugin_benchmarks

        return run_plugin_benchmarks(json_path=args.json, quick=args.quick)
    if args.workflows:
        from frys_edge.bench_workflows import run_workflow_benchmarks

        return run_workflow_benchmarks(json_path=args.json, quick=args.quick)
    from frys_edge.bench import run_benchmarks

    return run_benchmarks(json_path=args.json, quick=args.quick)


def _vector_parsers(sub: Any) -> None:
    vector = sub.add_parser("vector", help="create, fill and search vector collections")
    vsub = vector.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = vsub.add_parser(
        "create",
        help="create an empty vector collection",
        description="Create a collection of vectors of dimension D. Metric: cosine "
        "(default), dot or l2. Dtype: float32 (default) or int8 (4x less memory, "
        "quantised with a scale per vector). Index: exact (default) searches every vector; "
        "hnsw also keeps an HNSW graph (the hnsw extra: hnswlib) for fast approximate "
        "search of large collections, built by `frys run` in the background or by "
        "`frys vector index`, and saved in the data dir. Embedder: what turns texts into "
        "vectors, fixed at creation: lexical (built in: hashed words and 3-grams) or a name "
        "a native plugin registers with rt.vectors.register_embedder; texts for such a "
        "collection go through `frys run` (workflows, the API), where the plugin is loaded."
        "\n\nexample:\n"
        "  frys vector create default --dim 256 --metric cosine\n"
        "  frys vector create docs --dim 384 --embedder minilm\n"
        "  frys vector create big --dim 128 --index hnsw --m 16 --ef-search 64",
    )
    _config_flags(create)
    create.add_argument("name", metavar="NAME")
    create.add_argument("--dim", type=int, required=True, metavar="D", help="vector dimension")
    create.add_argument("--metric", choices=["cosine", "dot", "l2"], default="cosine")
    create.add_argument("--dtype", choices=["float32", "int8"], default="float32")
    create.add_argument(
        "--embedder",
        default="lexical",
        metavar="NAME",
        help="what embeds texts: lexical (built in, default) or one a plugin registers",
    )
    _index_flags(create)
    create.set_defaults(func=cmd_vector_create)

    tune = vsub.add_parser(
        "tune",
        help="change a collection's index settings",
        description="Change how a collection is searched. A new --ef-search applies at "
        "once; a new --index, --m or --ef-construction means the graph is built again.\n\n"
        "example:\n  frys vector tune big --ef-search 128\n  frys vector tune docs --index hnsw",
    )
    _config_flags(tune)
    tune.add_argument("name", metavar="NAME")
    _index_flags(tune)
    tune.set_defaults(func=cmd_vector_tune)

    build = vsub.add_parser(
        "index",
        help="build a collection's HNSW graph now and save it",
        description="Build the HNSW graph of a collection created with --index hnsw and "
        "save it in the data dir, printing progress; `frys run` then loads it instead of "
        "building it. Run it while `frys run` is stopped.\n\nexample:\n  frys vector index big",
    )
    _config_flags(build)
    build.add_argument("name", metavar="NAME")
    build.set_defaults(func=cmd_vector_index)

    add = vsub.add_parser(
        "add",
        help="add or replace items from a JSON lines file",
        description="Add items from FILE (- for stdin), one JSON object a line: "
        '{"id": ..., "vector": [...]} or {"id": ..., "text": "..."}, with optional '
        '"metadata": {...}. Text is embedded lexically (hashed words and 3-grams). Every '
        "line is checked first: a bad one is reported with its line number (exit 2) and "
        "nothing from the file is written.\n\nexample:\n"
        "  frys vector add default docs.jsonl\n"
        '  echo \'{"id": "a", "text": "pump overheating", "metadata": {"kind": "fault"}}\''
        " | frys vector add default -",
    )
    _config_flags(add)
    add.add_argument("name", metavar="NAME")
    add.add_argument("file", metavar="FILE")
    add.set_defaults(func=cmd_vector_add)

    search = vsub.add_parser(
        "search",
        help="find the items nearest to a text or a vector",
        description="Search, nearest first: score is cosine similarity, dot product, "
        "or Euclidean distance for l2. --filter keeps items whose metadata has equal "
        "fields (always exact). A collection with a saved HNSW index is searched through "
        "it, approximately; --exact searches every vector.\n\nexample:\n"
        '  frys vector search default --query "pump overheating" -k 5\n'
        "  frys vector search points --vector '[0.1, 0.2, 0.3]' --json",
    )
    _config_flags(search)
    search.add_argument("name", metavar="NAME")
    what = search.add_mutually_exclusive_group(required=True)
    what.add_argument("--query", metavar="TEXT", help="text, embedded like `add` does")
    what.add_argument("--vector", metavar="JSON", help="a JSON list of numbers")
    search.add_argument("-k", type=int, default=10, metavar="K", help="hits (default 10)")
    search.add_argument("--filter", metavar="JSON", help='metadata fields, e.g. {"kind": "x"}')
    search.add_argument(
        "--exact", action="store_true", help="search every vector even if an index is ready"
    )
    search.add_argument("--json", action="store_true", help='print {"hits": [...]} as JSON')
    search.set_defaults(func=cmd_vector_search)

    vlist = vsub.add_parser(
        "list",
        help="list vector collections",
        description="List collections with their dim, metric, dtype and item count.\n\n"
        "example:\n  frys vector list -c frys.toml",
    )
    _config_flags(vlist)
    vlist.add_argument("--json", action="store_true", help="print a JSON list")
    vlist.set_defaults(func=cmd_vector_list)

    stats = vsub.add_parser(
        "stats",
        help="load a collection and show its size",
        description="Load a collection as a search would and show its item count, backend "
        "(hnsw, numpy or python), index settings and state, and memory.\n\nexample:\n"
        "  frys vector stats default --json",
    )
    _config_flags(stats)
    stats.add_argument("name", metavar="NAME")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=cmd_vector_stats)

    drop = vsub.add_parser(
        "drop",
        help="delete a collection and all its items",
        description="Delete a collection and all its items in one transaction.\n\n"
        "example:\n  frys vector drop default",
    )
    _config_flags(drop)
    drop.add_argument("name", metavar="NAME")
    drop.set_defaults(func=cmd_vector_drop)


def _index_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", choices=["exact", "hnsw"], help="how to search (exact)")
    parser.add_argument("--m", type=int, metavar="M", help="HNSW links per node (16)")
    parser.add_argument(
        "--ef-construction", type=int, metavar="EF", help="HNSW build candidates (100)"
    )
    parser.add_argument("--ef-search", type=int, metavar="EF", help="HNSW search candidates (64)")


def _index_changes(args: argparse.Namespace) -> dict[str, Any]:
    flags = {"kind": args.index, "m": args.m, "ef_construction": args.ef_construction}
    flags["ef_search"] = args.ef_search
    return {key: value for key, value in flags.items() if value is not None}


def _describe_index(options: Any) -> str:
    if options.kind == "exact":
        return "exact search"
    graph = f"m={options.m} ef_construction={options.ef_construction}"
    return f"hnsw {graph} ef_search={options.ef_search}"


def cmd_vector_create(args: argparse.Namespace) -> int:
    import msgspec

    from frys_edge.hnsw import IndexOptions
    from frys_edge.vectors import VectorError, VectorStore

    try:
        options = msgspec.convert(_index_changes(args), IndexOptions)
    except msgspec.ValidationError as e:
        raise VectorError(f"collection {args.name}: bad index settings: {e}") from None
    with _open_storage(args, readonly=False) as store:
        info = VectorStore(store).create(
            args.name, args.dim, args.metric, args.dtype, options, args.embedder
        )
    print(
        f"created {info.name}: dim {info.dim}, {info.metric}, {info.dtype}, "
        f"{_describe_index(info.index)}, texts embedded by {info.embedder}"
    )
    return EXIT_OK


def cmd_vector_tune(args: argparse.Namespace) -> int:
    from frys_edge.vectors import VectorStore

    changes = _index_changes(args)
    if not changes:
        print(
            "frys: nothing to change; give --index, --m, --ef-construction or --ef-search",
            file=sys.stderr,
        )
        return EXIT_USAGE
    with _open_storage(args, readonly=False) as store:
        options = VectorStore(store).tune(args.name, **changes)
    print(f"{args.name}: {_describe_index(options)}")
    return EXIT_OK


def cmd_vector_index(args: argparse.Namespace) -> int:
    from frys_edge.vectors import VectorStore

    def progress(done: int, total: int) -> None:
        print(f"\rindexing {args.name}: {done}/{total} items", end="", file=sys.stderr)

    started = time.perf_counter()
    with _open_storage(args, readonly=False) as store:
        stats = VectorStore(store).build_index(args.name, progress)
    print(file=sys.stderr)
    print(
        f"indexed {stats.count} items of {args.name} in {time.perf_counter() - started:.1f} s "
        f"({stats.memory_bytes / 2**20:.0f} MiB in memory with the vectors)"
    )
    return EXIT_OK


def _read_vector_lines(path: str) -> tuple[list[Any], list[int]] | str:
    """The items of a JSON lines file with their line numbers, or the problem as text."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        return f"{path}: cannot read it: {e}"
    items: list[Any] = []
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            return f"{path}: line {number}: not JSON: {e}"
        if not isinstance(item, dict):
            return f'{path}: line {number}: expected an object like {{"id": ..., "vector": [...]}}'
        items.append(item)
        lines.append(number)
    return items, lines


def cmd_vector_add(args: argparse.Namespace) -> int:
    import anyio

    from frys_edge.vectors import VectorError, VectorStore

    read = _read_vector_lines(args.file)
    if isinstance(read, str):
        print(f"frys: {read}; nothing from the file was written", file=sys.stderr)
        return EXIT_USAGE
    items, lines = read
    with _open_storage(args, readonly=False) as store:
        try:
            count = anyio.run(VectorStore(store).upsert, args.name, items)
        except VectorError as e:
            if e.item is None:
                raise
            print(
                f"frys: {args.file}: line {lines[e.item]}: {e.reason}; "
                "nothing from the file was written",
                file=sys.stderr,
            )
            return EXIT_USAGE
    print(f"added {count} items to {args.name}")
    return EXIT_OK


def cmd_vector_search(args: argparse.Namespace) -> int:
    from frys_edge.vectors import VectorStore, hit_document

    parsed: dict[str, Any] = {}
    for flag in ("vector", "filter"):
        text = getattr(args, flag)
        if text is not None:
            try:
                parsed[flag] = json.loads(text)
            except ValueError as e:
                print(f"frys: --{flag} is not JSON: {e}", file=sys.stderr)
                return EXIT_USAGE
    with _open_storage(args, readonly=True) as store:
        hits = VectorStore(store).search(
            args.name,
            vector=parsed.get("vector"),
            query=args.query,
            k=args.k,
            filter=parsed.get("filter"),
            exact=args.exact,
        )
    if args.json:
        print(json.dumps({"hits": [hit_document(hit) for hit in hits]}, indent=2))
        return EXIT_OK
    for hit in hits:
        print(f"{hit.score:.4f}  {hit.id}  {json.dumps(hit.metadata)}")
    return EXIT_OK


def cmd_vector_list(args: argparse.Namespace) -> int:
    import msgspec

    from frys_edge.vectors import VectorStore

    with _open_storage(args, readonly=True) as store:
        infos = VectorStore(store).collections()
    if args.json:
        print(json.dumps(msgspec.to_builtins(infos), indent=2))
        return EXIT_OK
    for info in infos:
        print(
            f"{info.name}  dim {info.dim}  {info.metric}  {info.dtype}  {info.count} items  "
            f"{_describe_index(info.index)}"
        )
    return EXIT_OK


def cmd_vector_stats(args: argparse.Namespace) -> int:
    import msgspec

    from frys_edge.vectors import VectorStore

    with _open_storage(args, readonly=True) as store:
        stats = msgspec.to_builtins(VectorStore(store).stats(args.name))
    if args.json:
        print(json.dumps(stats, indent=2))
        return EXIT_OK
    for key, value in stats.items():
        print(f"{key}: {value}")
    return EXIT_OK


def cmd_vector_drop(args: argparse.Namespace) -> int:
    from frys_edge.vectors import VectorStore

    with _open_storage(args, readonly=False) as store:
        VectorStore(store).drop(args.name)
    print(f"dropped {args.name}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `frys` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from frys_edge.config import ConfigError
    from frys_edge.core import FrysError

    try:
        code: int = args.func(args)
    except ConfigError as e:
        print(f"frys: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FrysError as e:
        print(f"frys: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return code


if __name__ == "__main__":
    sys.exit(main())
