"""The ``traindeck`` command line: serve, train, view, convert.

Heavy imports (torch, FastAPI) happen inside the subcommands: the spawned trainer re-imports
this module as its ``__main__`` and should not pay for what it does not use.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
TOKEN_ENV = "TRAINDECK_TOKEN"


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {value}")
    return value


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", default="demo",
                        help="package.module:function, path/to/file.py:function or a built-in name (default: demo)")
    parser.add_argument("--config", metavar="FILE", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set trainer.iterations=1000 (repeatable)")
    parser.add_argument("--run-dir", metavar="DIR", help="run directory (default: runs/RECIPE-TIMESTAMP)")
    parser.add_argument("--resume", action="store_true", help="resume from the newest valid checkpoint")


def _add_listen_options(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=port, help=f"port, 0 for a free one (default: {port})")
    parser.add_argument("--token", help=f"access token (default: random; also ${TOKEN_ENV}); required off loopback")
    parser.add_argument("--allow-host", dest="allow_hosts", action="append", default=[], metavar="HOST[:PORT]",
                        help="also accept this Host/Origin (a tunnel or reverse proxy name); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="traindeck", description="A PyTorch trainer you watch and steer from a browser.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    serve = commands.add_parser("serve", help="train with a live dashboard", description="Train with a live dashboard.")
    _add_training_options(serve)
    _add_listen_options(serve, 8000)
    serve.add_argument("--nproc-per-node", type=_positive_int, default=1, metavar="N",
                       help="ranks on this machine (rank 0 talks to the server)")
    serve.add_argument("--quit-timeout", type=float, default=60.0, metavar="S",
                       help="on shutdown, seconds to wait for the trainer's save before stopping it (default: 60)")

    train = commands.add_parser("train", help="train headless (stdin commands, progress bar)",
                                description="Train without a server: commands on stdin, a progress bar on stderr.")
    _add_training_options(train)

    view = commands.add_parser("view", help="read-only dashboard over a run directory",
                               description="A read-only dashboard over a finished or running run.")
    view.add_argument("run_dir", metavar="RUN_DIR")
    _add_listen_options(view, 8000)

    convert = commands.add_parser("convert", help="convert weights between .pt and .safetensors",
                                  description="Convert a state dict file; formats follow the suffixes.")
    convert.add_argument("src", metavar="SRC")
    convert.add_argument("dst", metavar="DST")
    return parser


def _version() -> str:
    from trainer_core import __version__

    return __version__


def _resolve_training(args: argparse.Namespace) -> tuple[Any, Path]:
    """The run's config and directory; any problem with them is a UsageError naming it."""
    from trainer_core.recipe import resolve_config
    from trainer_core.rundir import resolve_run_dir

    try:
        config = resolve_config(args.recipe, args.config, args.overrides)
        run_dir = resolve_run_dir(args.run_dir, args.recipe, args.resume)
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:  # a user recipe failing at import: one line, not a traceback
        raise UsageError(f"recipe {args.recipe!r}: {type(exc).__name__}: {exc}") from None
    return config, run_dir


def _token(args: argparse.Namespace) -> str | None:
    """The explicit token; refuses a bind other machines can reach without one."""
    from server.settings import is_loopback

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    if token is not None and not token.strip():
        raise UsageError("--token must not be empty")
    if not is_loopback(args.host) and token is None:
        raise UsageError(f"--host {args.host} is reachable from other machines: pass --token (or set ${TOKEN_ENV})")
    return token


def _listen_settings(args: argparse.Namespace, run_dir: Path, read_only: bool, **extra: Any) -> Any:
    from server.auth import new_token
    from server.serve import bind_socket
    from server.settings import ServerSettings

    token = _token(args)
    sock = bind_socket(args.host, args.port)
    settings = ServerSettings(
        token=token or new_token(), run_dir=run_dir, host=args.host, port=sock.getsockname()[1],
        read_only=read_only, run_name=run_dir.name, version=_version(), extra_hosts=tuple(args.allow_hosts), **extra,
    )
    return settings, sock


def _shown_host(host: str) -> str:
    import socket

    from server.settings import WILDCARD_HOSTS

    return socket.gethostname() if host in WILDCARD_HOSTS else host


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.serve import ListenError, dashboard_url, remove_server_file, write_server_file
    from server.supervisor import Supervisor
    from server.trainer_process import TrainerSpec
    from trainer_core.config import config_to_dict

    if args.nproc_per_node != 1:
        raise UsageError(f"--nproc-per-node {args.nproc_per_node}: launching several ranks from serve is not "
                         "supported yet; use 1")
    _token(args)  # refuse an unprotected public bind before the slow part
    config, run_dir = _resolve_training(args)
    try:
        settings, sock = _listen_settings(args, run_dir, False, quit_timeout_s=args.quit_timeout)
    except ListenError as exc:
        raise UsageError(str(exc)) from None
    spec = TrainerSpec(recipe=args.recipe, config=config_to_dict(config), run_dir=str(run_dir), resume=args.resume,
                       nproc_per_node=args.nproc_per_node)
    supervisor = Supervisor(spec, quit_timeout_s=args.quit_timeout)
    app = create_app(settings, supervisor)
    url = dashboard_url(settings, _shown_host(args.host))
    server_file = write_server_file(run_dir, url, settings)
    try:
        asyncio.run(_serve(app, settings, sock, url, supervisor))
    finally:
        supervisor.ensure_stopped()
        remove_server_file(server_file)
    return 0


async def _serve(app: Any, settings: Any, sock: Any, url: str, supervisor: Any) -> None:
    from server.console import Console
    from server.serve import Server, read_stdin_lines, say, uvicorn_config

    loop = asyncio.get_running_loop()
    console = Console(supervisor, loop)
    supervisor.listeners.append(console.on_message)

    def on_stop() -> None:
        console.shutting_down = True
        say("traindeck: stopping: the trainer saves and quits (Ctrl-C again to abort)", err=True)
        loop.call_soon_threadsafe(supervisor.request_quit)

    def on_abort() -> None:
        say("traindeck: aborting: trainer killed", err=True)
        supervisor.abort()

    server = Server(uvicorn_config(app, settings), on_stop=on_stop, on_abort=on_abort)
    say(f"Dashboard: {url}")
    read_stdin_lines(console.on_line)
    await server.serve(sockets=[sock])


def cmd_view(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir} does not exist")

    from server.app import create_app
    from server.serve import ListenError, Server, dashboard_url, say, uvicorn_config

    try:
        settings, sock = _listen_settings(args, run_dir, True)
    except ListenError as exc:
        raise UsageError(str(exc)) from None
    server = Server(uvicorn_config(create_app(settings), settings), on_stop=lambda: None, on_abort=lambda: None)
    say(f"Dashboard: {dashboard_url(settings, _shown_host(args.host))}")
    if not (run_dir / "metrics.sqlite").is_file():
        say(f"traindeck: note: {run_dir} has no metrics.sqlite yet; the dashboard fills in when it appears",
            err=True)
    asyncio.run(server.serve(sockets=[sock]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from trainer_core.headless import run_headless

    config, run_dir = _resolve_training(args)
    return run_headless(args.recipe, config, run_dir, resume=args.resume)


def cmd_convert(args: argparse.Namespace) -> int:
    from trainer_core import io

    try:
        io.convert(args.src, args.dst)
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {args.dst}")
    return 0


COMMANDS = {"serve": cmd_serve, "train": cmd_train, "view": cmd_view, "convert": cmd_convert}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"traindeck: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
