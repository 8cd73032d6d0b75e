"""chatq start | stop | status | logs: runs the whole service on one machine, no Docker."""

from __future__ import annotations

import argparse
import os
import sys

from chatq.errors import ChatqError
from chatq.settings import load
from stack.lifecycle import cmd_start, cmd_stop
from stack.logview import SERVICES, cmd_logs
from stack.status import cmd_status


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run NATS, an inference worker and the API")
    start.add_argument("--detach", action="store_true", help="run in the background")
    start.add_argument(
        "--inference-workers",
        type=_at_least_one,
        metavar="N",
        help="N inference workers sharing each model's queue (INFERENCE_WORKERS; with GPUs, one each)",
    )
    start.add_argument(
        "--api-workers",
        type=_at_least_one,
        metavar="M",
        help="M API processes on the one port (API_WORKERS)",
    )
    start.add_argument(
        "--worker",
        action="append",
        metavar="PROFILE",
        help="a worker serving this model profile; repeat for one worker each (WORKER_PROFILES)",
    )
    sub.add_parser("stop", help="stop what start started")
    status = sub.add_parser("status", help="is it running and healthy: processes, workers, queues, GPUs")
    status.add_argument("--json", action="store_true", help="print GET /api/admin/status as JSON")
    logs = sub.add_parser("logs", help="show logs")
    logs.add_argument("service", nargs="?", choices=["chatq", *SERVICES])
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument(
        "--request", metavar="ID", help="every service's lines about one request (its id), in time order"
    )
    logs.add_argument("--json", action="store_true", help="with --request: the JSON lines as they are")
    from stack import admin_cli  # migrate, users, keys

    admin_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command == "start":
        # As settings, so a --detach'ed start and every child read the same.
        for name, value in (
            ("INFERENCE_WORKERS", args.inference_workers),
            ("API_WORKERS", args.api_workers),
            ("WORKER_PROFILES", ",".join(args.worker) if args.worker else None),
        ):
            if value is not None:
                os.environ[name] = str(value)
    try:
        s = load()
        if args.command in admin_cli.COMMANDS:
            return admin_cli.run(s, args)
        if args.command == "start":
            return cmd_start(s, args.detach)
        if args.command == "stop":
            return cmd_stop(s)
        if args.command == "status":
            return cmd_status(s, args.json)
        return cmd_logs(s, args.service, args.follow, args.request, args.json)
    except ChatqError as exc:
        print(f"chatq: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
