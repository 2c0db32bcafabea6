"""The one `parley` command. Every command's settings are a typed dataclass (parley/config.py):
`parley COMMAND --help` lists each key once with its type and default, and a key is given
as `key=value`, `--key=value`, `--key value` or (a bool) a bare `--key`; dashes read as underscores.

    parley models import smollm2                 # the default chat model
    parley models import PATH --name NAME        # an HF folder or a .gguf file
    parley models import PATH --quantize q4      # stored as 4-bit weights (q8: 8-bit; keep: a .gguf's own blocks)
    parley models list | export NAME DIR | remove NAME
    parley models versions NAME | rollback NAME [VERSION]   # versions kept by `parley learn`
    parley generate --model smollm2 --prompt "The capital of France is" --max-tokens 20
    parley chat [key=value ...]                  # the assistant
    parley chat --server http://HOST:PORT --api-key KEY   # the assistant of a `parley serve` server
    parley ingest PATH... [--user NAME]          # documents the assistant answers from, with citations
    parley serve [--port P] [key=value ...]      # the OpenAI-compatible API: the assistant's keys + the server's
    parley users add NAME | key NAME | list      # users of the server and their API keys
    parley data prepare OUT [--tokenizer DIR]    # training corpus + dialogs from offline packages
    parley train tokenizer|pretrain|sft|constitutional|dpo|reward|rl|asr [RECIPE.toml] [key=value ...]
    parley train intents [--data FILE] [--out FILE]   # the intent classifier, from parley/data/intents.yml
    parley train guard [--data DIR] [--out FILE]       # the safety/injection guard, from parley/data/guard/
    parley train reranker [--db PATH] [--user NAME]    # the knowledge reranker, on questions generated for chunks
    parley eval [MODEL] [--quick]                # the report card: every evaluation, compared with the last version
    parley learn [--dry-run] [--list]            # a learning round: feedback -> candidate -> gate -> promote

Errors in what the user gave (a missing file, an unknown model, a bad value) print one
line on stderr and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import difflib
import importlib
import signal
import sys
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Literal

import torch

from parley.config import ConfigError, parse_cli, setting, to_dict
from parley.engine.config import EngineConfig
from parley.engine.request import EngineError
from parley.pipeline.assistant import AssistantConfig
from parley.registry import DEFAULT_MODEL, Registry

# command -> {action -> (what it does, "module:SettingsClass")}; action None: the command has no actions
COMMANDS: dict[str, dict[str | None, tuple[str, str]]] = {
    "models": {"import": (f"import an HF folder, a .gguf file, or `{DEFAULT_MODEL}`", "parley.cli:ImportConfig"),
               "list": ("list imported models", "parley.cli:ListConfig"),
               "export": ("write a model as an HF folder (transformers/vLLM load it)", "parley.cli:ExportConfig"),
               "remove": ("delete an imported model", "parley.cli:RemoveConfig"),
               "versions": ("list a model's versions (the current one marked *)", "parley.cli:VersionsConfig"),
               "rollback": ("make an earlier version current again", "parley.cli:RollbackConfig")},
    "generate": {None: ("plain completion of a prompt (no chat template)", "parley.cli:GenerateConfig")},
    "chat": {None: ("chat in the terminal (or with piped input, one turn per line)", "parley.cli:ChatConfig")},
    "ingest": {None: ("add .txt .md .html .pdf files to a user's knowledge base",
                      "parley.pipeline.knowledge:IngestConfig")},
    "serve": {None: ("the OpenAI-compatible HTTP API (and Parley's own routes)", "parley.serve.settings:Settings")},
    "users": {None: ("users and API keys of the server", "parley.serve.main:UsersConfig")},
    "train": {"tokenizer": ("train a BPE tokenizer", "parley.train.bpe:TokenizerConfig"),
              "pretrain": ("pretrain a model from a recipe", "parley.train.pretrain:PretrainConfig"),
              "sft": ("fine-tune on dialogs (full or LoRA)", "parley.train.sft:SFTConfig"),
              "constitutional": ("critique-and-revise data, then SFT", "parley.train.constitutional:ConstitutionalConfig"),
              "dpo": ("direct preference optimisation on pairs", "parley.train.dpo:DPOConfig"),
              "intents": ("retrain the intent classifier's head", "parley.pipeline.nlu:IntentsConfig"),
              "guard": ("train the safety and injection guard", "parley.train.guard:GuardTrainConfig"),
              "reranker": ("train the knowledge reranker (a query map, or a cross-encoder)", "parley.train.rerank:RerankTrainConfig"),
              "reward": ("train a reward model on preference pairs", "parley.train.reward:RewardConfig"),
              "rl": ("GRPO against a reward model and the rails, KL to the base", "parley.train.rl:RLConfig"),
              "asr": ("train a wav2vec 2.0 recogniser from scratch on synthesized speech", "parley.train.asr:ASRConfig")},
    "speak": {None: ("speak text into a WAV file (piper, or espeak-ng)", "parley.voice.main:SpeakConfig")},
    "transcribe": {None: ("print the text spoken in a WAV file (whisper, or wav2vec 2.0)",
                          "parley.voice.main:TranscribeConfig")},
    "eval": {None: ("the report card: every evaluation of a model, compared with its previous version",
                    "parley.learn.report:EvalConfig")},
    "learn": {None: ("a learning round: users' feedback trains a candidate that the report card gates",
                     "parley.learn.rounds:LearnConfig")},
    "data": {"prepare": ("build the training corpus and dialog sets from offline sources",
                         "parley.train.corpus:DataConfig")},
}


@dataclass
class ImportConfig:
    source: str = setting(help=f"an HF folder, a .gguf file, `{DEFAULT_MODEL}` or `gemma3-270m`", positional="SOURCE")
    name: str = setting("", "name to register it under ('' = from the source)")
    force: bool = setting(False, "replace a model of the same name")
    quantize: Literal["auto", "none", "q8", "q4", "keep"] = setting(
        "auto", "weights stored quantized (parley/model/quant.py): q8 or q4 for any source; keep = a .gguf "
                "file's own blocks (Q8_0/Q4_0/Q4_1/Q5_0/Q4_K kept, Q6_K/Q5_1/Q5_K to q8); none = floats; "
                "auto = keep for gemma3-270m, none otherwise")


@dataclass
class ListConfig:
    pass


@dataclass
class ExportConfig:
    name: str = setting(help="the imported model", positional="NAME")
    dir: str = setting(help="folder to write (an HF folder: config, tokenizer, safetensors)", positional="DIR")


@dataclass
class RemoveConfig:
    name: str = setting(help="the imported model to delete", positional="NAME")


@dataclass
class VersionsConfig:
    name: str = setting(help="the model", positional="NAME")


@dataclass
class RollbackConfig:
    name: str = setting(help="the model", positional="NAME")
    version: str = setting("", "the version to make current, e.g. v2 ('' = the newest one older than the current)",
                           positional="VERSION")


@dataclass
class GenerateConfig:
    prompt: str = setting(help="text to continue ('-' reads stdin)")
    model: str = setting(DEFAULT_MODEL, "imported model name")
    max_tokens: int = setting(128, "most tokens to generate")
    temperature: float = setting(0.0, "sampling temperature (0 = greedy)")
    top_k: int = setting(0, "sample from the k most likely tokens (0 = all)")
    top_p: float = setting(1.0, "nucleus sampling mass")
    repetition_penalty: float = setting(1.0, "penalty on tokens already in the context (1 = none)")
    seed: int | None = setting(None, "sampling seed, for output that repeats exactly")
    stop: list[str] = setting(factory=list, help="stop at any of these strings (repeatable: --stop A --stop B)")
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class ChatConfig(AssistantConfig):
    server: str = setting("", "talk to the assistant of a `parley serve` server at this URL (with api_key=KEY) "
                              "instead of running one here ('' = run it here)")
    audio_in: str = setting("", "a WAV file: transcribe it and take it as the one message (a spoken turn)")
    audio_out: str = setting("", "with audio_in: write the spoken answer to this WAV file")
    voice: str = setting("default", "the voice of audio_out and live (see `parley speak --help`)")
    live: bool = setting(False, "talk through the default microphone and speaker, as the web UI's Talk button "
                                "(needs an audio device and `pip install sounddevice`)")


def settings_class(command: str, action: str | None):
    module, name = COMMANDS[command][action][1].split(":")
    return getattr(importlib.import_module(module), name)


def overview() -> str:
    rows = [f"  {command} {action or ''}".ljust(26) + what
            for command, actions in COMMANDS.items() for action, (what, _) in actions.items()]
    return ("usage: parley [--debug] COMMAND [ACTION] [key=value | --key value ...]\n\n"
            "Parley: an open conversational assistant. `parley COMMAND [ACTION] --help` lists its settings.\n\n"
            "commands:\n" + "\n".join(rows) + "\n\n  --debug                 show tracebacks on errors")


def _choose(word: str | None, choices, what: str) -> str:
    if word not in choices:
        close = difflib.get_close_matches(word or "", [c for c in choices if c], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{'no ' + what if word is None else f'unknown {what} {word!r}'}{hint}; "
                          f"choose one of {', '.join(c for c in choices if c)} (`parley --help`)")
    return word


def parse_args(argv: list[str] | None = None) -> SimpleNamespace:
    """`[--debug] COMMAND [ACTION] SETTINGS...` as (debug, command, action, settings, prog);
    the settings are left for the command's own config class to parse."""
    rest, debug = list(sys.argv[1:] if argv is None else argv), False
    while rest and rest[0].startswith("-"):
        flag = rest.pop(0)
        if flag in ("-h", "--help"):
            print(overview())
            raise SystemExit(0)
        if flag != "--debug":
            raise ConfigError(f"unknown option {flag!r} before the command; `parley --help` lists the commands")
        debug = True
    command = _choose(rest.pop(0) if rest else None, COMMANDS, "command")
    actions, action = COMMANDS[command], None
    if None not in actions:
        if rest and rest[0] in ("-h", "--help"):
            print(f"usage: parley {command} ACTION ...\n\nactions:\n" + "\n".join(
                f"  {a:10} {what}" for a, (what, _) in actions.items()))
            raise SystemExit(0)
        action = _choose(rest.pop(0) if rest else None, actions, f"action of `parley {command}`")
    return SimpleNamespace(debug=debug, command=command, action=action, settings=rest,
                     prog=f"parley {command}" + (f" {action}" if action else ""))


def load_settings(args: SimpleNamespace):
    """The command's settings, parsed from its arguments (`--help` prints them and exits)."""
    return parse_cli(settings_class(args.command, args.action), args.settings, prog=args.prog)


def cmd_models(args) -> int:
    cfg, reg = load_settings(args), Registry()
    if args.action == "import":
        info = reg.import_model(cfg.source, name=cfg.name or None, force=cfg.force, quantize=cfg.quantize)
        print(f"imported {info.name} ({info.meta['params'] / 1e6:.1f}M parameters) into {info.path}")
    elif args.action == "list":
        rows = reg.list()
        if not rows:
            print(f"no models in {reg.models_dir}; run `parley models import {DEFAULT_MODEL}`")
        for m in rows:
            print(f"{m.name:24} {m.meta.get('params', 0) / 1e6:8.1f}M  {m.size_bytes / 2**20:8.0f} MiB  "
                  f"{m.meta.get('architecture', '?'):20} {m.meta.get('source', '')}")
    elif args.action == "versions":
        for v in reg.versions(cfg.name):
            print(f"{'*' if v.current else ' '} {v.label:5} {v.info.get('created_at', ''):20} "
                  f"{v.info.get('note', '')}")
    elif args.action == "rollback":
        print(f"{cfg.name} is now {reg.rollback(cfg.name, cfg.version).label}")
    elif args.action == "export":
        print(f"exported {cfg.name} to {reg.export(cfg.name, cfg.dir)}")
    else:
        reg.remove(cfg.name)
        print(f"removed {cfg.name}")
    return 0


def cmd_generate(args) -> int:
    from parley.engine.engine import Engine
    from parley.engine.sampling import SamplingParams
    from parley.engine.text import TextStream

    cfg = load_settings(args)
    prompt = sys.stdin.read() if cfg.prompt == "-" else cfg.prompt
    if not prompt:
        raise ValueError("the prompt is empty")
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)
    # the numbers are checked above, before the (slow) model load; the engine steps in this thread
    model, tokenizer, _ = Registry().load(cfg.model, dtype=getattr(torch, cfg.engine.dtype))
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    engine = Engine.from_config(model, cfg.engine)
    for piece in TextStream(engine, tokenizer, tokenizer.encode(prompt), params, stop=cfg.stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from parley import chat
    from parley.pipeline.assistant import Assistant

    cfg = load_settings(args)
    if cfg.audio_out and not cfg.audio_in:
        raise ValueError("audio_out= is where a spoken turn's answer goes: give audio_in=QUESTION.wav too")
    if cfg.audio_in:  # missing, a pipe or a device: said before the slow loads
        from parley.voice.audio import read_file
        read_file(cfg.audio_in)
    if cfg.live:
        return _live_chat(cfg)
    if cfg.server:  # the server's own settings apply
        from parley.serve.client import RemoteAssistant

        given = to_dict(cfg)
        local = ChatConfig(server=cfg.server, api_key=cfg.api_key, audio_in=cfg.audio_in, audio_out=cfg.audio_out,
                           voice=cfg.voice)  # the settings that stay on this side
        unused = [f"{k}={given[k]}" for k, v in to_dict(local).items() if given[k] != v]
        if unused:
            raise ValueError(f"server= talks to a server, which has its own settings: drop {' '.join(unused)}")
        remote = RemoteAssistant(cfg.server, key=cfg.api_key or None)
        try:
            return _voice_chat(remote, cfg) if cfg.audio_in else chat.run(remote)
        finally:
            remote.close()
    if cfg.url and cfg.backend == "local":
        raise ValueError("url= is the OpenAI-compatible server of backend=openai; for a `parley serve` server "
                         "give server=URL api_key=KEY")
    assistant_cfg = AssistantConfig(**{f.name: getattr(cfg, f.name) for f in fields(AssistantConfig)})
    if cfg.backend == "local":
        Registry().get(cfg.model)  # a missing model is reported before the slower loads
    session = chat.Session(Assistant.build(assistant_cfg))
    try:
        return _voice_chat(session, cfg) if cfg.audio_in else chat.run(session)
    finally:
        session.close()


def _live_chat(cfg: ChatConfig) -> int:
    from parley.voice import live

    if cfg.audio_in:
        raise ValueError("live= talks through the microphone; audio_in= is one spoken turn from a file: give one")
    if not cfg.server:
        return live.talk_locally(cfg)
    url = cfg.server.rstrip("/").replace("https://", "wss://").replace("http://", "ws://") + "/api/voice"
    return live.talk(url, cfg.api_key, cfg.voice)


def _voice_chat(session, cfg: ChatConfig) -> int:
    from parley.voice.main import voice_chat

    return voice_chat(session, cfg.audio_in, cfg.audio_out, cfg.voice)


def cmd_train(args) -> int:
    if args.action == "intents":  # not a recipe stage: retrains the intent head from the intents file
        from parley.pipeline.nlu import train_intents_main

        return train_intents_main(args.settings)
    if args.action == "guard":  # not a recipe stage either: the guard's head, from parley/data/guard/
        from parley.train.guard import train_guard_main

        return train_guard_main(args.settings)
    if args.action == "reranker":  # nor this: trained on questions generated for a store's chunks
        from parley.train.rerank import train_reranker_main

        return train_reranker_main(args.settings)
    module = importlib.import_module(COMMANDS["train"][args.action][1].split(":")[0])
    module.main(load_settings(args))
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


def cmd_eval(args) -> int:
    from parley.learn import report

    report.main(load_settings(args))
    return 0


def cmd_learn(args) -> int:
    from parley.learn import rounds

    rounds.main(load_settings(args))
    return 0


def cmd_data(args) -> int:
    from parley.train import corpus

    return corpus.main(args.settings, prog=args.prog)


def cmd_voice(args) -> int:
    from parley.voice import main as voice

    return (voice.speak_main if args.command == "speak" else voice.transcribe_main)(args.settings, prog=args.prog)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as the command (not called from Python, e.g. a test, whose sockets must not kill it)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `parley ... | head` ends quietly, like other tools
    argv = sys.argv[1:] if argv is None else list(argv)
    handlers = {"models": cmd_models, "generate": cmd_generate, "chat": cmd_chat, "ingest": cmd_ingest,
                "serve": cmd_serve, "users": cmd_users, "train": cmd_train, "data": cmd_data,
                "eval": cmd_eval, "learn": cmd_learn,
                "speak": cmd_voice, "transcribe": cmd_voice}
    debug = "--debug" in argv[:1]
    try:
        args = parse_args(argv)
        debug = args.debug
        torch.set_flush_denormal(True)  # denormals slow CPU decoding ~10x
        return handlers[args.command](args)
    except (ValueError, LookupError, OSError, EngineError) as e:  # ConfigError is a ValueError
        if debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"parley: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
