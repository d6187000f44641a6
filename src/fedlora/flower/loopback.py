"""A Flower deployment on one machine (loopback), with TLS and SuperNode authentication, and nothing left behind.

:class:`LoopbackFederation` writes a CA and a server certificate for 127.0.0.1/localhost, one P-384 key pair per
SuperNode, starts a SuperLink (TLS, ``--enable-supernode-auth``), registers the SuperNodes' public keys with
``flwr supernode register``, starts the SuperNodes (``partition-id=i num-partitions=N``), submits runs with
``flwr run . <connection> --stream``, and on :meth:`stop` ends every process it started and everything they
started (by process id, found through the sessions it created), then checks that none is left.

Command line (what ``scripts/flower_deploy.sh`` runs)::

    python -m fedlora.flower.loopback --supernodes 2 --run-config "method='fedsa' rounds=2 clients=2"

The run config's ``clients`` must equal ``--supernodes`` (one SuperNode per partition).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

CONNECTION = "loopback"
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# -- certificates and keys -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Certificates:
    ca: Path  # the root the SuperNodes and the flwr CLI trust
    cert: Path  # the SuperLink's certificate (SAN: 127.0.0.1, ::1, localhost)
    key: Path


def write_certificates(folder: Path, extra_ips: tuple[str, ...] = ()) -> Certificates:
    """A self-signed CA and a SuperLink certificate for the loopback addresses (and ``extra_ips``: the gateway's
    address the SuperNodes connect to), valid for one day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora loopback CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in extra_ips]
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    out.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    out.key.chmod(0o600)
    return out


def write_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format (what flower-supernode and `flwr supernode register` read)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


def shared_threads(environ: dict[str, str], supernodes: int, cpus: int | None = None) -> dict[str, str]:
    """Intra-op threads per process when ``supernodes`` SuperNodes share this host's cores.

    Our choice: where the environment sets neither ``OMP_NUM_THREADS`` nor ``MKL_NUM_THREADS``, every process gets
    ``max(1, cpus // supernodes)``. Left to torch, each SuperNode's ClientApp or model worker takes every core, the
    clients train at once and their OpenMP threads fight (MiniLM, 2 SuperNodes on 2 cores: 26.1 s a round against
    15.0 s with one thread each). A SuperNode on a machine of its own is not started by this launcher."""
    if "OMP_NUM_THREADS" in environ or "MKL_NUM_THREADS" in environ:
        return {}
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = str(max(1, cpus // max(1, supernodes)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s; see {log}")


# -- processes -------------------------------------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, session id) of every process (Linux /proc; psutil elsewhere)."""
    table: dict[int, tuple[int, int]] = {}
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
            if fields[0] != "Z":
                table[int(entry)] = (int(fields[1]), int(fields[3]))
        return table
    import psutil

    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                table[p.pid] = (p.ppid(), os.getsid(p.pid))
        except (psutil.Error, OSError):
            continue
    return table


def family(roots: list[int]) -> set[int]:
    """Live processes started by ``roots``: their descendants, and every process in a session one of them leads.

    Each root is started in a new session; Flower's own children either inherit it or (SuperExec) start their own
    below it, and Ray's workers, reparented to init, keep those sessions, so the sessions catch them too.
    """
    table = _proc_table()
    found = {pid for pid in roots if pid in table}
    while True:
        sessions = {table[pid][1] for pid in found} & (set(roots) | found)
        grown = found | {pid for pid, (ppid, sid) in table.items() if ppid in found or sid in sessions}
        if grown == found:
            return found
        found = grown


def terminate(pids: set[int], grace: float = 10.0) -> set[int]:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns the ids still alive (should be none)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        alive = pids & set(_proc_table())
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = pids & set(_proc_table())
        if not alive:
            return set()
    return pids & set(_proc_table())


def _parent_death_signal():
    """A ``preexec_fn`` that has the child sent SIGTERM when the thread that started it ends (Linux's
    ``PR_SET_PDEATHSIG``); None where there is no prctl. Flower's own processes below the SuperLink and the SuperNodes
    watch their parents, so the whole deployment goes when the launcher is killed -9."""
    import ctypes
    import ctypes.util

    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_signal() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the signal was set
            os._exit(1)

    return set_signal


# -- the federation --------------------------------------------------------------------------------------------------
@dataclass
class LoopbackFederation:
    """SuperLink + ``supernodes`` SuperNodes on 127.0.0.1 with TLS and SuperNode authentication, in ``workdir``."""

    workdir: Path
    supernodes: int = 2
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every process
    port: int = 0  # SuperLink's HTTPS port (Fleet, Control and runtime APIs); 0 = a free one
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_keys: list[tuple[Path, Path]] = field(default_factory=list)
    workers: bool = False  # a model worker beside each SuperNode (node config model-worker): the model built once
    gateway: str | None = None  # an address of this host: SuperNodes connect to a Fleet-API-only gateway there
    gateway_port: int = 0
    state_dirs: bool = False  # a state directory for each SuperNode (node config state-dir): clients survive restarts
    die_with_parent: bool = False  # every process started gets SIGTERM when this one dies, even by kill -9 (Linux)
    node_extra: dict[int, str] = field(default_factory=dict)  # more node config for a SuperNode, e.g. {2: "reply-delay=20.0"}
    _sockets: Path | None = None  # the short folder of the workers' sockets, where the work directory's path is too long

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.environ = os.environ | FLOWER_ENV | {"FLWR_HOME": str(self.home)} | self.env
        self.environ |= shared_threads(self.environ, self.supernodes)

    # ---- start ----
    def start(self) -> LoopbackFederation:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.certs = write_certificates(self.workdir / "certificates", (self.gateway,) if self.gateway else ())
        self.port = self.port or free_port()
        self._write_connection()
        self._spawn("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.cert),
            "--ssl-keyfile", str(self.certs.key), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port),
        ])
        _wait_for_port(self.port, self.processes["superlink"], 60, "flower-superlink", self.logs / "superlink.log")
        if self.gateway:  # the SuperNodes' network reaches the Fleet API only (fedlora.flower.gateway)
            self.gateway_port = self.gateway_port or free_port()
            self._spawn("gateway", [
                sys.executable, "-m", "fedlora.flower.gateway", "--listen", f"{self.gateway}:{self.gateway_port}",
                "--superlink", f"127.0.0.1:{self.port}", "--certfile", str(self.certs.cert), "--keyfile", str(self.certs.key),
                "--ca-certfile", str(self.certs.ca),
            ])
            _wait_for_port(self.gateway_port, self.processes["gateway"], 60, "fedlora gateway", self.logs / "gateway.log", host=self.gateway)
        for i in range(self.supernodes):
            private, public = write_node_key(self.workdir / "keys", f"supernode-{i}")
            self.node_keys.append((private, public))
            self.register(public)
            if self.workers:
                self.start_worker(i)
            self.start_supernode(i, private)
        return self

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect: the gateway when there is one, else the SuperLink itself."""
        return f"{self.gateway}:{self.gateway_port}" if self.gateway else f"127.0.0.1:{self.port}"

    def worker_socket(self, partition: int) -> Path:
        """In the work directory, or in a short private folder under the system's temporary directory when the work
        directory's path would make the socket's longer than a Unix socket allows."""
        from fedlora.flower.worker import MAX_SOCKET_PATH

        folder = self.workdir / "workers"
        if len(os.fsencode(folder / "supernode-0000.sock")) > MAX_SOCKET_PATH:
            if self._sockets is None:
                self._sockets = Path(tempfile.mkdtemp(prefix="fedlora-workers-"))
            folder = self._sockets
        return folder / f"supernode-{partition}.sock"

    def start_worker(self, partition: int) -> subprocess.Popen:
        """``python -m fedlora.flower.worker`` for SuperNode ``partition``; returns once its socket is listening."""
        sock = self.worker_socket(partition)
        sock.unlink(missing_ok=True)  # a killed worker's socket (a work directory used again): wait for the new one
        proc = self._spawn(f"worker-{partition}", [sys.executable, "-m", "fedlora.flower.worker", "--socket", str(sock)])
        deadline = time.monotonic() + 120
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the model worker of SuperNode {partition} did not start; see {self.logs / f'worker-{partition}.log'}")
            time.sleep(0.05)
        return proc

    def node_config(self, partition: int) -> str:
        items = [f"partition-id={partition}", f"num-partitions={self.supernodes}"]
        if self.workers:
            items.append(f"model-worker='{self.worker_socket(partition)}'")
        if self.state_dirs:
            items.append(f"state-dir='{self.workdir / 'state' / f'supernode-{partition}'}'")
        if partition in self.node_extra:
            items.append(self.node_extra[partition])
        return " ".join(items)

    def _write_connection(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs.ca}"\n'
        )

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(command, env=self.environ, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.workdir, start_new_session=True,
                                preexec_fn=_parent_death_signal() if self.die_with_parent else None)
        log.close()
        self.processes[name] = proc
        return proc

    def flwr(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this federation's connection."""
        return subprocess.run(["flwr", *args], env=self.environ, cwd=cwd or self.workdir, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def register(self, public_key: Path, attempts: int = 30) -> None:
        for _ in range(attempts):
            res = self.flwr("supernode", "register", str(public_key), CONNECTION)
            if res.returncode == 0:
                return
            time.sleep(1.0)
        raise RuntimeError(f"`flwr supernode register {public_key}` failed: {res.stdout[-2000:]} {res.stderr[-2000:]}")

    def start_supernode(self, partition: int, private_key: Path, *, name: str | None = None, extra: list[str] = ()) -> subprocess.Popen:
        name = name or f"supernode-{partition}"
        return self._spawn(name, [
            "flower-supernode", "--superlink", self.fleet_address, "--root-certificates", str(self.certs.ca),
            "--auth-supernode-private-key", str(private_key),
            # the SuperNode's own runtime API (its SuperExec and ClientApp processes) is TLS too
            "--port", str(free_port()), "--ssl-certfile", str(self.certs.cert), "--ssl-keyfile", str(self.certs.key),
            "--ssl-ca-certfile", str(self.certs.ca),
            "--node-config", self.node_config(partition), *extra,
        ])

    # ---- run ----
    def run(self, app: Path, run_config: str, timeout: float | None = 1800, echo: bool = False) -> subprocess.CompletedProcess:
        """``flwr run APP loopback --run-config ... --stream``: returns when the run has finished. ``echo``: copy its
        output (the ServerApp's log) to this process's stdout as it comes."""
        command = ["flwr", "run", str(Path(app).resolve()), CONNECTION, "--run-config", run_config, "--stream"]
        if not echo:
            return self.flwr(*command[1:], timeout=timeout, cwd=Path(app).resolve())
        proc = subprocess.Popen(command, env=self.environ, cwd=Path(app).resolve(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        lines = []
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(line)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return subprocess.CompletedProcess(command, proc.returncode, "".join(lines), "")

    def outcome(self, res: subprocess.CompletedProcess) -> tuple[int, str]:
        """(exit code, reason) of a finished ``flwr run``: 0 when the SuperLink lists the run as completed; 2 when the
        ServerApp refused it (its log names ``fedlora.RunRefused``), 1 for any other failure. ``flwr run --stream``
        itself exits 0 whatever became of the run, so the run's status is asked of the SuperLink (``flwr ls``)."""
        import json
        import re

        output = res.stdout + res.stderr
        started = re.search(r"Successfully started run (\d+)", output)
        if res.returncode != 0 or not started:
            last = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
            return res.returncode or 1, f"`flwr run` failed (exit code {res.returncode}): {last[0].strip()}"
        listed = self.flwr("ls", CONNECTION, "--run-id", started[1], "--format", "json")
        try:
            run = json.loads(listed.stdout)["runs"][0]
        except (ValueError, KeyError, IndexError):
            return 1, f"could not read run {started[1]}'s status from the SuperLink: {(listed.stdout + listed.stderr).strip()[-500:]}"
        status, details = run["status"], (run.get("status-details") or "").strip()
        if status.endswith(":completed"):
            return 0, ""
        refused = re.search(r"^fedlora\.RunRefused: (.*)$", output, re.MULTILINE)
        if refused:
            return 2, refused[1].strip()
        reason = details.removeprefix("ServerApp failed with exception:").strip() or "no details"
        return 1, f"run {started[1]} ended {status}: {reason.splitlines()[0]}; see {self.logs}"

    # ---- stop ----
    def stop(self) -> set[int]:
        """End every process this federation started and all they started; returns the ids left (should be none)."""
        roots = [p.pid for p in self.processes.values()]
        left = terminate(family(roots))
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)
        for p in self.processes.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return left

    def __enter__(self) -> LoopbackFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        left = self.stop()
        if left:
            raise RuntimeError(f"processes {sorted(left)} survived the federation's teardown")


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, object, dict]:
    """The command line, the run's settings and the Flower-only keys given (resume, round-timeout), all checked
    before any process starts: a bad one is one line and exit 2."""
    import click
    from flwr.common.config import parse_config_args

    from fedlora.app.experiment import RunConfig
    from fedlora.flower.config import FLOWER_ONLY, flower_options, from_flower, to_flower
    from fedlora.flower.server_app import method_in_process_only

    p = argparse.ArgumentParser(prog="python -m fedlora.flower.loopback", description=__doc__.split("\n\n")[0])
    p.add_argument("--supernodes", type=int, default=2, help="SuperNodes to start, one per partition (the run's clients)")
    p.add_argument("--run-config", action="append", default=[], metavar="\"k=v ...\" | FILE.toml",
                   help="overrides as \"k=v ...\" or a .toml file; keys are `fedlora run`'s long flags; given again, the "
                   "later wins (e.g. --run-config run.toml --run-config \"resume=true\")")
    p.add_argument("--app", default=".", help="the Flower app: this repository (default .)")
    p.add_argument("--workdir", default=None, help="certificates, keys, FLWR_HOME, logs, the SuperNodes' state directories "
                   "(default: a new temporary folder; to resume a run with its clients' state, pass the same one again)")
    p.add_argument("--gateway", default=None, metavar="ADDRESS",
                   help="SuperNodes connect through a Fleet-API-only gateway on ADDRESS (an address of this host)")
    p.add_argument("--workers", action=argparse.BooleanOptionalAction, default=True,
                   help="a model worker beside each SuperNode, so the model is built once (default on)")
    p.add_argument("--state-dirs", action=argparse.BooleanOptionalAction, default=True,
                   help="a state directory for each SuperNode, so its client survives a restart (default on)")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.run_config:
        try:
            overrides |= parse_config_args([item] if item else None)
        except OSError as exc:
            refuse(f"--run-config {item}: {exc.strerror or exc}; pass an existing .toml file or \"k=v ...\"")
        except (ValueError, click.ClickException) as exc:  # TOML that does not parse, in a file or in "k=v ..."
            where = f" ({exc})" if isinstance(exc, ValueError) else ""  # Flower's own message for "k=v" is a paragraph
            refuse(f"--run-config {item!r} is not valid TOML{where}; values are TOML: strings need quotes, e.g. "
                   "--run-config \"method='fedsa' rounds=2\"")
    try:
        overrides.setdefault("clients", args.supernodes)
        config = from_flower(to_flower(RunConfig()) | overrides).validate()
        options = {k: v for k, v in flower_options(overrides).items() if k in overrides}  # given, checked
        why = method_in_process_only(config)
    except (ValueError, OSError) as exc:
        refuse(str(exc))
    if why:
        refuse(f"method {config.method} runs in-process only ({why}); run it with `fedlora run --method {config.method}`")
    if config.clients != args.supernodes:
        refuse(f"the run has clients={config.clients} but --supernodes {args.supernodes}; one SuperNode per client")
    if options.get("resume") and not config.out:
        refuse("resume needs the run directory: pass --run-config \"out='/abs/path/runs/NAME' resume=true\"")
    assert set(options) <= set(FLOWER_ONLY)
    return args, config, options


def refuse(message: str) -> NoReturn:
    """A setting refused before anything starts: one line on stderr, exit 2."""
    print(f"flower_deploy: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_config_toml(config, options: dict) -> str:
    """The run config file the launcher hands to ``flwr run``: the settings that differ from the defaults, and the
    Flower-only keys (``resume``, ``round-timeout``) that were given."""
    import json

    from fedlora.flower.config import to_toml

    return to_toml(config) + "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items())


def main(argv: list[str] | None = None) -> int:
    """Start, run, stop. Exit 0 only when the run finished; a run the ServerApp refused (a setting, the run directory,
    a resume that does not fit) exits 2 and one that failed otherwise 1, each with the ServerApp's reason in one line
    on stderr. A ``kill -9`` of this process takes what it started with it (they get SIGTERM)."""
    args, config, options = _parse(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fedlora-loopback-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run_config = workdir / "run-config.toml"
    run_config.write_text(run_config_toml(config, options))
    print(f"loopback federation in {workdir} (logs in {workdir / 'logs'})", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` of this script still stops what it started
    fed = LoopbackFederation(workdir, args.supernodes, workers=args.workers, state_dirs=args.state_dirs, gateway=args.gateway,
                             die_with_parent=True)
    rc, left = 1, set()
    try:
        fed.start()
        print(f"SuperLink 127.0.0.1:{fed.port} (TLS, SuperNode auth); {args.supernodes} SuperNodes registered and started"
              + (", each with a model worker" if args.workers else ""), flush=True)
        res = fed.run(Path(args.app), str(run_config), timeout=None, echo=True)
        rc, reason = fed.outcome(res)
        if rc:
            print(f"flower_deploy: error: {reason}", file=sys.stderr, flush=True)
    finally:
        left = fed.stop()
        print("stopped every process it started" if not left else f"could not stop processes {sorted(left)}", flush=True)
    return rc if not left else (rc or 1)


if __name__ == "__main__":
    sys.exit(main())
