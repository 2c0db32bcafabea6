"""`parley serve` and `parley users`: run the HTTP server, manage who may use it.

    parley users add ann --admin            # a user (admins may list users over the API)
    parley users key ann                    # prints a new API key, once: only its hash is kept
    parley users list
    parley serve --model smollm2 --port 8000
    parley serve --no-auth                  # loopback only: every request is the user "local"

Both default to the database PARLEY_HOME/parley.db, the one `parley chat` uses.
"""

from __future__ import annotations

import argparse
import sys

from parley.registry import DEFAULT_MODEL, store_target


def serve_main(argv: list[str]) -> int:
    from parley.serve.settings import Settings

    parser = argparse.ArgumentParser(prog="parley serve", description="OpenAI-compatible API + Parley's routes")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model to serve (default {DEFAULT_MODEL})")
    parser.add_argument("--db", help="SQLite database (default PARLEY_HOME/parley.db)")
    parser.add_argument("--no-auth", action="store_true", help="no API keys; allowed on loopback addresses only")
    parser.add_argument("--rate-limit", type=int, default=600, help="requests a minute per key (0 = none)")
    parser.add_argument("--max-pending", type=int, default=32, help="generation requests that may wait")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--serial", action="store_true",
                        help="serve one request at a time instead of batching concurrent ones continuously")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0..65535, not {args.port}")
    import torch

    # Only the scheduler thread runs multi-threaded torch work: a second OpenMP team in the
    # process (this thread's, after loading the model) halves decode speed. So this thread, and
    # every request thread, computes with one thread, and the scheduler's gets them all.
    threads = torch.get_num_threads() if not args.serial else None
    if threads:
        torch.set_num_threads(1)
    settings = Settings(db=store_target(args.db), model=args.model, host=args.host, no_auth=args.no_auth,
                        requests_per_minute=args.rate_limit, max_pending=args.max_pending, dtype=args.dtype,
                        batching=not args.serial, threads=threads)
    import uvicorn

    from parley.serve.app import create_app

    app = create_app(settings)
    print(f"Parley serving {args.model} on http://{args.host}:{args.port}/v1"
          + (" (no auth: everyone is 'local')" if args.no_auth else ""), file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def users_main(argv: list[str], out=sys.stdout) -> int:
    from parley.store import Store

    parser = argparse.ArgumentParser(prog="parley users", description="users and API keys of the server")
    parser.add_argument("--db", help="SQLite database (default PARLEY_HOME/parley.db)")
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="create a user")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may list users over the API")
    sub.add_parser("list", help="list users")
    key = sub.add_parser("key", help="create an API key for a user (printed once)")
    key.add_argument("name")
    args = parser.parse_args(argv)
    with Store(store_target(args.db)) as store:
        if args.action == "add":
            user = store.add_user(args.name, role="admin" if args.admin else "user")  # ValueError if taken
            print(f"added {user.role} {user.name} (id {user.id}); `parley users key {user.name}` makes a key", file=out)
        elif args.action == "list":
            for user in store.list_users():
                print(f"{user.id}\t{user.name}\t{user.role}\t{user.created_at}", file=out)
        else:
            user = store.get_user_by_name(args.name)
            if user is None:
                raise ValueError(f"no user named {args.name!r}: add one with `parley users add {args.name}`")
            print(store.create_api_key(user.id), file=out)
    return 0
