"""`browservm serve`: the controller service on uvicorn, in this process.

Order of life: the state directory's lock, host network up, reconcile, then the HTTP API. On
SIGTERM or Ctrl-C: stop accepting, close viewers with 1001 and a reason, end event streams,
let requests finish, stop the manager's tasks. VMs keep running and are re-found at the next
start, unless --stop-vms-on-exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from browservm.api.app import build_app
from browservm.api.keys import api_key, signing_key
from browservm.api.logs import LOG_FORMATS
from browservm.api.logs import configure as configure_logs
from browservm.api.proxy import UVICORN_WEBSOCKETS
from browservm.api.service import ControllerService
from browservm.api.tls import ServerTls, load_server_tls
from browservm.api.tokens import ViewerTokens
from browservm.config import Settings
from browservm.controller import Controller, ServeLock, open_controller
from browservm.errors import OperationFailed

log = logging.getLogger("browservm.serve")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    serve = commands.add_parser("serve", parents=[common], help="the controller: HTTP API, viewer proxy, "
                                "operator page; reconciles with what runs, then watches every VM until stopped")
    add_service_options(serve)
    # serve's alone: a cluster host's API is reached by its fronts over the cluster's private network.
    serve.add_argument("--tls-cert", type=Path, metavar="FILE",
                       help="serve HTTPS with this PEM certificate (chain): viewer links become https, their "
                            "desktops wss (also BROWSERVM_TLS_CERT)")
    serve.add_argument("--tls-key", type=Path, metavar="FILE",
                       help="the certificate's PEM private key: unencrypted, not readable by others (0600 or 0640)")


def add_service_options(parser: argparse.ArgumentParser) -> None:
    """The controller service's options: `serve`'s, and a cluster host's (`host join`)."""
    parser.add_argument("--listen", metavar="ADDRESS:PORT", help="where the API listens (default 127.0.0.1:8080)")
    parser.add_argument("--public-url", metavar="URL", help="how browsers reach the controller, for viewer links")
    parser.add_argument("--idle-timeout", type=int, metavar="SECONDS",
                        help="reap a VM without a viewer for this long (default 900)")
    parser.add_argument("--max-lifetime", type=int, metavar="SECONDS", help="reap a VM older than this (default 7200)")
    parser.add_argument("--viewer-ttl", type=int, metavar="SECONDS", help="viewer links expire after (default 600)")
    parser.add_argument("--audit-retention", type=int, metavar="SECONDS",
                        help="the audit trail keeps an entry this long (default 90 days)")
    parser.add_argument("--snapshots", action="store_true", default=None,
                        help="restore new VMs from a snapshot of a booted desktop (made at the first create)")
    parser.add_argument("--pool", metavar="N|TEMPLATE=N,...",
                        help="keep N VMs restored and ready: of the default template, or per template as "
                             "desktop=4,oauth=2 (default none)")
    parser.add_argument("--templates", type=Path, metavar="FILE",
                        help="the operator's templates (TOML), beside `default` (also BROWSERVM_TEMPLATES)")
    parser.add_argument("--log-format", choices=LOG_FORMATS,
                        help="text (default), or JSON one object a line; an access line per request, with its id")
    parser.add_argument("--stop-vms-on-exit", action="store_true", default=None,
                        help="destroy every VM when the controller stops (default: leave them running)")


class ServiceServer(uvicorn.Server):
    """uvicorn, with the service told first when it shuts down: a viewer learns why it is closed.
    `signals`: SIGTERM and SIGINT stop it (only a process's main thread can take them)."""

    def __init__(self, config: uvicorn.Config, service: ControllerService, *, signals: bool = True) -> None:
        super().__init__(config)
        self._service = service
        self._signals = signals

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._service.stop_serving()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT start the graceful shutdown. Unlike uvicorn's own, this does not raise the
        signal again afterwards: the service still has to stop its tasks, and the exit is a clean 0."""
        if not self._signals:
            yield
            return
        previous = {signum: signal.signal(signum, self.handle_exit) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def listen_socket(settings: Settings) -> socket.socket:
    host, port = settings.listen_address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle off only on sockets that say they are TCP.
    # With it on, every response after a connection's first (uvicorn writes head and body apart)
    # waited for the client's delayed ACK: 40 ms per API request, and stalls in the viewer's stream.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise OperationFailed(f"listen on {settings.listen}", exc) from None
    return sock


def run(settings: Settings) -> int:
    # The pair is checked before anything is made: a mistake in it leaves nothing behind.
    tls = None if settings.tls_cert is None or settings.tls_key is None else load_server_tls(
        settings.tls_cert, settings.tls_key)
    with ServeLock(settings.state_dir):
        listener = listen_socket(settings)
        # Port 0 asks the kernel for a free port: links and messages name the one it gave.
        host, port = listener.getsockname()[:2]
        settings = settings.model_copy(update={"listen": f"{host}:{port}"})
        with listener, open_controller(settings, serving=True) as controller:
            service, key_file = service_of(controller)
            return asyncio.run(_serve(service, listener, key_file, tls))


def service_of(controller: Controller) -> tuple[ControllerService, Path | None]:
    """The controller's service, with the state directory's keys; and the API key's file (None: given)."""
    settings = controller.settings
    key, key_file = api_key(settings.state_dir, settings.api_key)
    tokens = ViewerTokens(signing_key(settings.state_dir), ttl=settings.viewer_ttl)
    return ControllerService(controller, api_key=key, tokens=tokens), key_file


def uvicorn_config(service: ControllerService, tls: ServerTls | None = None) -> uvicorn.Config:
    """`tls`: HTTPS and wss on the listener, with a pair load_server_tls checked."""
    # No permessage-deflate (~13x the CPU on a VNC stream, LAB-NOTES), viewers' messages bounded.
    return uvicorn.Config(build_app(service), lifespan="on", log_level="warning", access_log=False,
                          **UVICORN_WEBSOCKETS, timeout_graceful_shutdown=10,
                          **(tls.uvicorn_options() if tls is not None else {}))


async def _serve(service: ControllerService, listener: socket.socket, key_file: object,
                 tls: ServerTls | None) -> int:
    settings = service.settings
    configure_logs(settings.log_format)
    for warning in tls.warnings if tls is not None else ():
        log.warning("tls: %s", warning)
    server = ServiceServer(uvicorn_config(service, tls), service)
    # From here on SIGTERM means "stop gracefully", also while reconciling, before uvicorn runs.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, server.handle_exit)
    try:
        for action in await service.start():
            print(f"reconcile: {action}", flush=True)
        vms = len(await service.all())
        where = f" (VM network in namespace {settings.netns})" if settings.netns else ""
        print(f"serve: listening on {settings.base_url}{where}; watching {vms} VM(s); stop with SIGTERM or Ctrl-C",
              flush=True)
        print(f"  API key:        {key_file or 'given in settings (BROWSERVM_API_KEY)'}", flush=True)
        if tls is not None:
            print(f"  TLS:            {tls.summary()}", flush=True)
        print(f"  operator page:  {settings.base_url}/   API docs: {settings.base_url}/docs", flush=True)
        state = f" --state-dir {settings.state_dir}" if str(settings.state_dir) != "/var/lib/browservm" else ""
        print(f"  a desktop in your browser: browservm vm create --url {settings.base_url}{state}   "
              "(prints the viewer link)", flush=True)
        await server.serve(sockets=[listener])
    finally:
        await service.stop()
        listener.close()
    print("serve: stopped; VMs left running" if not settings.stop_vms_on_exit else "serve: stopped, VMs destroyed",
          flush=True)
    return 0
