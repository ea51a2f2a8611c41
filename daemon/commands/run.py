"""`confguard run`: the daemon in the foreground (systemd Type=notify aware)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from daemon.commands.check import load_all
from daemon.config import Config, load_config
from daemon.errors import ConfigErrors
from daemon.service.lifecycle import Daemon


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run the daemon in the foreground",
                              description="Run confguard in the foreground (systemd Type=notify aware).")
    p.add_argument("--config", default="config.yaml", help="path to config.yaml (default: %(default)s)")
    p.add_argument("--observe", action="store_true", help="decide, log and audit, but send nothing")
    p.add_argument("--record", metavar="FILE", help="append every received frame with its receive time (for replay)")
    # Also accepted after `run` (SUPPRESS keeps `confguard --log-level X run` working too).
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error", "critical"),
                   default=argparse.SUPPRESS, help="overrides logging.level from the config")
    p.set_defaults(func=run_command)


def run_command(args: Any) -> int:
    from daemon.service.logs import configure_logging

    try:
        config = load_config(args.config)
    except ConfigErrors as exc:
        if isinstance(exc.config, Config):
            load_all(args.config)  # every problem in one pass, the other rules' too
        raise
    configure_logging(getattr(args, "log_level", None) or config.logging.level, config.logging.format)
    daemon = Daemon(config, config_path=args.config, observe=args.observe, record_path=args.record)
    return asyncio.run(daemon.run())
