"""A real PostgreSQL server for tests: initdb + pg_ctl in a temporary folder, 127.0.0.1 only.

    from _postgres import postgres  # noqa: F401  (the module-scoped fixture)

    async def test_x(postgres: PostgresServer) -> None:
        conn = await asyncpg.connect(postgres.dsn)

The server binaries are looked up on PATH, then in /usr/lib/postgresql/*/bin (Debian's
postgresql-NN package). When they are absent the tests SKIP and say so, or FAIL when `CI` is set
(`.ci/run` sets it and installs them). PostgreSQL refuses to run as root, so when the tests run as root every server
command runs as the `postgres` user via `runuser -u postgres --`, in a folder that user
owns. The server listens on 127.0.0.1 at a free port, with `trust` authentication for the
`confguard` role (a throw-away cluster), and is stopped (`-m immediate`) and deleted at the
end. `restart()`, `stop()` and `start()` let failure tests take the database away.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "find_bin_dir", "postgres"]


def find_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return Path(d)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One throw-away cluster. `dsn` connects as the superuser `confguard` to db `postgres`."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.as_root = os.geteuid() == 0
        self.folder = Path(tempfile.mkdtemp(prefix="confguard-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = _free_port()
        if self.as_root:
            shutil.chown(self.folder, "postgres", "postgres")
        self.folder.chmod(0o700)

    @property
    def dsn(self) -> str:
        return f"postgresql://confguard@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(self.folder),
                              env={**os.environ, "LC_ALL": "C"})
        if check and proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}\n{log}")
        return proc

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "confguard", "--auth=trust", "-E", "UTF8",
                  "--no-sync")

    def start(self) -> None:
        """Start (or start again) on the same port; waits until it accepts connections."""
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} "
                f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                f"-c max_connections=50 -c shared_buffers=16MB")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "-t", "60",
                  "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def restart(self) -> None:
        """Stop (fast: every session is ended) and start again on the same port."""
        self.stop("fast")
        self.start()

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):  # .ci/run installs them: absent there is a failure
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: "
                    "apt-get install postgresql-15 (.ci/run does this)")
    server = PostgresServer(bin_dir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.cleanup()
