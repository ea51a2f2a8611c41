"""A faithful local fake of Genesys Cloud (OAuth, REST, notification WebSockets) with fault
injection, for tests, demos and benchmarks. See `daemon.sandbox.server.Sandbox`.

Modules: world (pure state), app (aiohttp routes), faults, journal, scenario (worlds and the
/sandbox/ test driver), server (`Sandbox`), cli (`confguard sandbox`)."""

from daemon.sandbox.server import Sandbox

__all__ = ["Sandbox"]
