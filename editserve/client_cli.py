"""`editserve edit` and `editserve edits list|show|undo`: the edit routes of a running server."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx


def add_parsers(sub: argparse._SubParsersAction) -> None:
    def connection(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--server",
            default=os.environ.get("EDITSERVE_SERVER", "http://127.0.0.1:8000"),
            help="server URL (EDITSERVE_SERVER)",
        )
        p.add_argument(
            "--admin-key",
            default=os.environ.get("EDITSERVE_ADMIN_KEY"),
            help="admin key (EDITSERVE_ADMIN_KEY)",
        )

    p = sub.add_parser("edit", help="make an edit on a running server")
    connection(p)
    p.add_argument("--method", default="rome")
    p.add_argument("--kind", choices=["insert", "modify", "erase"], default="modify")
    p.add_argument("--prompt", help="a question containing the subject")
    p.add_argument("--subject")
    p.add_argument("--target", help="the new answer (erase: optional)")
    p.add_argument("--rephrase", action="append", default=[], help="a paraphrase to check")
    p.add_argument("--hparams", type=json.loads, help="JSON object of hyperparameter overrides")
    p.add_argument("--file", help="JSON file with a list of requests (instead of --prompt ...)")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(run=_edit)

    p = sub.add_parser("edits", help="list, show or undo edits on a running server")
    actions = p.add_subparsers(dest="action", required=True)
    for name, helptext in (("list", "all edits"), ("show", "one edit"), ("undo", "undo one")):
        a = actions.add_parser(name, help=helptext)
        connection(a)
        if name != "list":
            a.add_argument("edit_id")
        if name == "undo":
            a.add_argument(
                "--rebase",
                action="store_true",
                help="recompute later edits on the model without this one",
            )
    p.set_defaults(run=_edits)


def _call(args: argparse.Namespace, method: str, path: str, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    try:
        r = httpx.request(
            method, args.server.rstrip("/") + path, headers=headers, timeout=600, **kw
        )
    except httpx.HTTPError as exc:
        raise SystemExit(f"editserve: cannot reach {args.server}: {exc}") from exc
    body = r.json()
    if r.status_code >= 400:
        raise SystemExit(f"editserve: {r.status_code}: {body['error']['message']}")
    return body


def _edit(args: argparse.Namespace) -> int:
    if args.file:
        with open(args.file) as handle:
            requests = json.load(handle)
    elif args.prompt and args.subject:
        requests = [
            {
                "prompt": args.prompt,
                "subject": args.subject,
                "target_new": args.target,
                "rephrase": args.rephrase,
            }
        ]
    else:
        raise SystemExit("editserve: give --prompt and --subject (and --target), or --file")
    body = {
        "method": args.method,
        "kind": args.kind,
        "requests": requests,
        "hparams": args.hparams,
        "dry_run": args.dry_run,
    }
    result = _call(args, "POST", "/edits", json=body)
    for check in result.get("checks", {}).get("requests", []):
        mark = "ok " if check["success"] else "NO "
        print(
            f"{mark} {check['prompt']}\n    before: {check['before']}\n    after:  {check['after']}"
        )
    for probe in result.get("checks", {}).get("locality", []):
        print(f"{'same' if probe['unchanged'] else 'MOVED'} {probe['prompt']}")
    print(
        f"edit {result['id']} ({result['status']}), model version {result['model_version']}, "
        f"{result['timings']['total_s']:.1f} s"
    )
    return 0


def _edits(args: argparse.Namespace) -> int:
    if args.action == "list":
        for e in _call(args, "GET", "/edits")["data"]:
            first = e["requests"][0]
            print(
                f"{e['id']}  {e['status']:8}  {e['method']:6}  v{e['model_version']}  "
                f"{first['subject']} -> {first['target_new']}"
            )
    elif args.action == "show":
        json.dump(_call(args, "GET", f"/edits/{args.edit_id}"), sys.stdout, indent=2)
        print()
    else:
        result = _call(
            args,
            "DELETE",
            f"/edits/{args.edit_id}",
            params={"rebase": "true" if args.rebase else "false"},
        )
        later = ", ".join(result["later_edits"]) or "none"
        print(
            f"undone {args.edit_id}; model version {result['model_version']}; "
            f"later edits computed on top of it: {later}"
        )
    return 0
