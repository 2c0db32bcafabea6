"""The one `parley` command.

    parley models import smollm2                 # the default chat model
    parley models import PATH [--name NAME]      # an HF folder or a .gguf file
    parley models list | export NAME DIR | remove NAME
    parley generate --model smollm2 --prompt "The capital of France is" --max-tokens 20
    parley chat [key=value ...]                  # the assistant: `parley chat --help` lists settings
    parley chat --url http://HOST:PORT --key KEY # the assistant of a `parley serve` server
    parley ingest PATH... [--user NAME]          # documents the assistant answers from, with citations
    parley serve [--host H] [--port P] [--model M]   # OpenAI-compatible API; `parley users add NAME` for keys
    parley data prepare OUT [--tokenizer DIR]    # training corpus + dialogs from offline packages
    parley train tokenizer|pretrain|sft [RECIPE.toml] [key=value ...]
    parley train intents [--data FILE] [--out FILE]   # the intent classifier, from parley/data/intents.yml

Errors in what the user gave (a missing file, an unknown model, a bad value) print one
line on stderr and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import signal
import sys

import torch

from parley.engine.sampling import SamplingParams
from parley.registry import DEFAULT_MODEL, Registry

OWN_PARSERS = ("ingest", "serve", "users")  # commands whose options their own module parses
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# stage name -> (module, config class); imported only when the stage runs
STAGES = {"tokenizer": ("parley.train.bpe", "TokenizerConfig"), "pretrain": ("parley.train.pretrain", "PretrainConfig"),
          "sft": ("parley.train.sft", "SFTConfig")}


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float, max_tokens: int) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"imported model name (default: {DEFAULT_MODEL})")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="compute precision (default bfloat16: fast on AVX-512/AMX CPUs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="Parley: an open conversational assistant")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="import, list, export and remove models")
    msub = models.add_subparsers(dest="models_command", required=True)
    imp = msub.add_parser("import", help=f"import an HF folder, a .gguf file, or `{DEFAULT_MODEL}`")
    imp.add_argument("source")
    imp.add_argument("--name", help="name to register it under (default: from the source)")
    imp.add_argument("--force", action="store_true", help="replace a model of the same name")
    msub.add_parser("list", help="list imported models")
    exp = msub.add_parser("export", help="write a model as an HF folder (transformers/vLLM load it)")
    exp.add_argument("name")
    exp.add_argument("dir")
    rem = msub.add_parser("remove", help="delete an imported model")
    rem.add_argument("name")

    gen = sub.add_parser("generate", help="plain completion of a prompt (no chat template)")
    gen.add_argument("--prompt", required=True, help="text to continue ('-' reads stdin)")
    _add_sampling_args(gen, temperature=0.0, max_tokens=128)

    chat = sub.add_parser("chat", help="chat in the terminal (or with piped input, one turn per line)",
                          add_help=False)
    chat.add_argument("-h", "--help", action="store_true", help="list the assistant's settings")
    chat.add_argument("--url", help="talk to a `parley serve` server at this URL instead of a local assistant")
    chat.add_argument("--key", help="the server's API key for --url (from `parley users key NAME`)")
    chat.add_argument("settings", nargs=argparse.REMAINDER,
                      help="key=value settings of the assistant; `parley chat --help` lists them")

    ingest = sub.add_parser("ingest", help="add .txt .md .html .pdf files to a user's knowledge base", add_help=False)
    ingest.add_argument("settings", nargs=argparse.REMAINDER, help="see `parley ingest --help`")

    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP API (and Parley's own routes)", add_help=False)
    serve.add_argument("settings", nargs=argparse.REMAINDER, help="see `parley serve --help`")
    users = sub.add_parser("users", help="users and API keys of the server", add_help=False)
    users.add_argument("settings", nargs=argparse.REMAINDER, help="see `parley users --help`")

    train = sub.add_parser("train", help="training stages: tokenizer, pretrain, sft; intents (the NLU head)",
                           description="parley train STAGE [RECIPE.toml] [key=value ...]; "
                                       "parley train STAGE --help lists every key")
    train.add_argument("stage", choices=sorted([*STAGES, "intents"]))
    train.add_argument("settings", nargs=argparse.REMAINDER, help="a TOML recipe, then key=value overrides")

    data = sub.add_parser("data", help="build the training corpus and dialog sets from offline sources",
                          add_help=False)
    data.add_argument("action", choices=["prepare"])
    data.add_argument("settings", nargs=argparse.REMAINDER, help="see `parley data prepare --help`")
    return parser


def _sampling(args, stop_ids=frozenset()) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop_ids=stop_ids)


def _load(args):
    from parley.engine.engine import Engine

    sampling = _sampling(args)  # validate the numbers before the (slow) model load
    model, tokenizer, _ = Registry().load(args.model, dtype=DTYPES[args.dtype])
    return Engine(model), tokenizer, sampling


def cmd_models(args) -> int:
    reg = Registry()
    if args.models_command == "import":
        info = reg.import_model(args.source, name=args.name, force=args.force)
        print(f"imported {info.name} ({info.meta['params'] / 1e6:.1f}M parameters) into {info.path}")
    elif args.models_command == "list":
        rows = reg.list()
        if not rows:
            print(f"no models in {reg.models_dir}; run `parley models import {DEFAULT_MODEL}`")
        for m in rows:
            print(f"{m.name:24} {m.meta.get('params', 0) / 1e6:8.1f}M  {m.size_bytes / 2**20:8.0f} MiB  "
                  f"{m.meta.get('architecture', '?'):20} {m.meta.get('source', '')}")
    elif args.models_command == "export":
        print(f"exported {args.name} to {reg.export(args.name, args.dir)}")
    elif args.models_command == "remove":
        reg.remove(args.name)
        print(f"removed {args.name}")
    return 0


def cmd_generate(args) -> int:
    from parley.engine.text import TextStream

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise ValueError("the prompt is empty")
    engine, tokenizer, params = _load(args)
    for piece in TextStream(engine, tokenizer, tokenizer.encode(prompt), params, stop=args.stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from parley import chat
    from parley.config import parse_cli
    from parley.pipeline.assistant import Assistant, AssistantConfig

    if args.url:  # the server's own settings apply
        from parley.serve.client import RemoteAssistant

        if args.settings:
            raise ValueError(f"--url talks to a server, which has its own settings: drop {' '.join(args.settings)}")
        remote = RemoteAssistant(args.url, key=args.key)
        try:
            return chat.run(remote)
        finally:
            remote.close()
    if args.key:
        raise ValueError("--key is the API key of a server: give --url too")
    cfg = parse_cli(AssistantConfig, args.settings, prog="parley chat")
    if cfg.backend == "local":
        Registry().get(cfg.model)  # a missing model is reported before the slower loads
    session = chat.Session(Assistant.build(cfg))
    try:
        return chat.run(session)
    finally:
        session.close()


def cmd_train(args) -> int:
    import importlib

    from parley.config import parse_cli

    if args.stage == "intents":  # not a recipe stage: retrains the intent head from the intents file
        from parley.pipeline.nlu import train_intents_main

        return train_intents_main(args.settings)
    module_name, config_name = STAGES[args.stage]
    module = importlib.import_module(module_name)
    module.main(parse_cli(getattr(module, config_name), args.settings, prog=f"parley train {args.stage}"))
    return 0


def cmd_ingest(args) -> int:
    from parley.pipeline.knowledge import ingest_main

    return ingest_main(args.settings)


def cmd_serve(args) -> int:
    from parley.serve.main import serve_main

    return serve_main(args.settings)


def cmd_users(args) -> int:
    from parley.serve.main import users_main

    return users_main(args.settings)


def cmd_data(args) -> int:
    from parley.train import corpus

    return corpus.main(args.settings, prog="parley data prepare")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] in OWN_PARSERS:
        # these commands parse their own options: hand them everything after the command's name
        args = build_parser().parse_args(argv[:command + 1])
        args.settings = argv[command + 1:]
    else:
        args = build_parser().parse_args(argv)
    if getattr(args, "help", False):  # chat's settings are listed by its config's own --help
        args.settings = ["--help", *args.settings]
    return args


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `parley ... | head` ends quietly, like other tools
    args = parse_args(argv)
    torch.set_flush_denormal(True)  # denormals slow CPU decoding ~10x
    handlers = {"models": cmd_models, "generate": cmd_generate, "chat": cmd_chat, "ingest": cmd_ingest,
                "serve": cmd_serve, "users": cmd_users, "train": cmd_train, "data": cmd_data}
    try:
        return handlers[args.command](args)
    except (ValueError, LookupError, OSError) as e:
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"parley: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
