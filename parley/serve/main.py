"""`parley serve` and `parley users`: run the HTTP server, manage who may use it.

    parley users add ann --admin            # a user (admins may list users over the API)
    parley users key ann                    # prints a new API key, once: only its hash is kept
    parley users list
    parley users untrust eve                # eve's feedback never becomes training data (`parley learn`)
    parley serve --model smollm2 --port 8000
    parley serve persona="You are terse." self_check=true web_search_url=http://127.0.0.1:8888
    parley serve --no-auth                  # loopback only: every request is the user `user` ("local")
    parley serve --max-connections-per-client 1024   # behind a reverse proxy: every client has its address
    parley serve --help                     # every key: the assistant's (as `parley chat`), the server's

Both default to the database PARLEY_HOME/parley.db, the one `parley chat` uses.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Literal

from parley.config import parse_cli, setting
from parley.registry import store_target


def serve_main(argv: list[str]) -> int:
    import torch

    from parley.serve.settings import Settings

    settings = parse_cli(Settings, argv, prog="parley serve")
    # Only the engine's thread runs multi-threaded torch work: a second OpenMP team in the process
    # (this thread's, after loading the model) halves decode speed. So this thread, and every
    # request thread, computes with one thread, and the engine's gets them all.
    threads = settings.engine.threads or torch.get_num_threads()
    settings = dataclasses.replace(settings, engine=dataclasses.replace(settings.engine, threads=threads))
    torch.set_num_threads(1)
    import uvicorn

    from parley.serve.app import create_app
    from parley.serve.http import BoundedHttp

    app = create_app(settings)
    print(f"Parley serving {settings.model} on http://{settings.host}:{settings.port}/v1"
          f" (CPU path: {app.state.server.engine.kernels_path}; keys and values in "
          f"{app.state.server.engine.kv_dtype})"
          + (f" (no auth: everyone is {settings.user!r})" if settings.no_auth else ""), file=sys.stderr)
    http = BoundedHttp.capped(settings.max_connections_per_client, settings.max_connections)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", http=http)
    return 0


@dataclass
class UsersConfig:
    action: Literal["add", "list", "key", "revoke", "delete", "trust", "untrust", "optout", "optin"] = setting(
        help="add a user, list users, create a user's API key (printed once; only its hash is kept), revoke "
             "all of a user's keys, delete a user with everything they own (needs yes=true), or mark a user "
             "untrusted (their feedback never becomes training data: `parley learn`) or trusted again, or opt a "
             "user out of learning (their adapter and its training data are deleted, their examples taken out "
             "of the learning rounds' folders, and nothing of theirs is trained on again) or back in",
        positional="ACTION")
    name: str = setting("", "the user to add, make a key for, revoke or delete", positional="NAME")
    admin: bool = setting(False, "add: the user may list users over the API")
    yes: bool = setting(False, "delete: yes, delete the user's conversations, memory and documents too")
    db: str = setting("", "SQLite file or postgresql:// URL ('' = PARLEY_HOME/parley.db)")

    def __post_init__(self):
        if self.action != "list" and not self.name:
            raise ValueError(f"`parley users {self.action}` needs the user's name: parley users {self.action} NAME")
        if self.action == "delete" and not self.yes:
            raise ValueError(f"deleting {self.name} deletes their conversations, memory and documents for good: "
                             f"parley users delete {self.name} --yes")


def users_main(argv: list[str], out=sys.stdout) -> int:
    from parley.learn.personal import forget
    from parley.store import Store

    args = parse_cli(UsersConfig, argv, prog="parley users")
    with Store(store_target(args.db or None)) as store:
        if args.action == "add":
            user = store.add_user(args.name, role="admin" if args.admin else "user")  # ValueError if taken
            print(f"added {user.role} {user.name} (id {user.id}); `parley users key {user.name}` makes a key", file=out)
        elif args.action == "list":
            for user in store.list_users():
                print(f"{user.id}\t{user.name}\t{user.role}\t{user.created_at}", file=out)
        else:
            user = store.get_user_by_name(args.name)
            if user is None:
                raise ValueError(f"no user named {args.name!r}: `parley users list` shows who there is")
            if args.action == "key":
                print(store.create_api_key(user.id), file=out)
            elif args.action in ("trust", "untrust"):
                store.set_trusted(user.id, args.action == "trust")
                print(f"{user.name} is {args.action}ed: their feedback "
                      f"{'may become' if args.action == 'trust' else 'never becomes'} training data", file=out)
            elif args.action in ("optout", "optin"):
                store.set_personalized(user.id, args.action == "optin")
                gone = forget(user.id) if args.action == "optout" else []
                print(f"{user.name} opted {args.action[3:]} of personalization"
                      + (f"; deleted or redacted {len(gone)} adapter, data and round folder(s)" if gone else ""),
                      file=out)
            elif args.action == "revoke":
                print(f"revoked {store.revoke_keys(user.id)} API key(s) of {user.name}; their data stays", file=out)
            else:
                store.delete_user(user.id)
                forget(user.id)  # their adapters and training data too, in every learning round
                print(f"deleted {user.name} and everything they owned", file=out)
    return 0
