"""Shared test setup.

TRITON_INTERPRET=1 must be set before triton is imported anywhere, so that Triton kernels run
on CPU under the interpreter (the GPU tests skip without CUDA instead).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# --dtype=auto means bf16 on a CPU with bf16 matrix units: pin fp32 so that the exact comparisons
# (resume bitwise, 1 process == 2) hold on every CPU; the bf16 path has tests of its own
os.environ["NANOFM_CPU_DTYPE"] = "float32"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import glob  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402


def _postgres_bin(name: str) -> str | None:
    """Debian keeps the server's programs in /usr/lib/postgresql/<version>/bin, off the PATH."""
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


@pytest.fixture(scope="session")
def postgres_url():
    """A real, throwaway PostgreSQL server on 127.0.0.1 (Debian's `postgresql` package), started
    for this test session and stopped after it: its URL. .ci/run installs the package and sets
    NANOFM_REQUIRE_POSTGRES=1, so there a missing server fails; elsewhere the tests skip."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        if os.environ.get("NANOFM_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required here (NANOFM_REQUIRE_POSTGRES=1) but initdb/pg_ctl are missing")
        pytest.skip("needs a PostgreSQL server: apt-get install postgresql (.ci/run does)")
    pytest.importorskip("psycopg", reason="the PostgreSQL log needs psycopg (requirements.txt)")
    root = tempfile.mkdtemp(prefix="nanofm-pg-")
    data, sockets = os.path.join(root, "data"), os.path.join(root, "sock")
    os.makedirs(sockets)
    # the server refuses to run as root: as root, run it as Debian's postgres user
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(as_user + [initdb, "-D", data, "-U", "nanofm", "--auth=trust", "-E", "UTF8"], check=True,
                   capture_output=True)
    subprocess.run(as_user + [pg_ctl, "-D", data, "-l", os.path.join(root, "server.log"), "-w", "-t", "60", "-o",
                              f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield {"url": f"postgresql://nanofm@127.0.0.1:{port}/postgres", "pg_ctl": as_user + [pg_ctl], "data": data,
               "port": port, "sockets": sockets, "log": os.path.join(root, "server.log")}
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
