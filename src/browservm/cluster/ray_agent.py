"""Host agents as Ray actors: one detached, named actor per host, pinned to its host's Ray node by
the node's label (`browservm.host=NAME`), restarted by Ray whenever it dies.

The actor runs its HostAgent on an event loop of its own (a thread), so the host's controller
and the agent's heartbeat share one loop whatever Ray does with its calls; Ray's calls come in on
its threads (max_concurrency) and wait for the loop. Ray runs `__init__` again on every restart:
that is where the agent registers (a new epoch) and re-adopts its host's VMs.

Fronts reach agents with `Agents` (a Ray driver): calls with a deadline, each failure of Ray's
(no such actor, actor died, deadline) one `HostUnreachable` naming the host and Ray's words.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray.exceptions

from browservm.api.logs import configure as configure_logs
from browservm.cluster.agent import HostAgent, HostVms, Refusal
from browservm.cluster.errors import HostFailed, HostUnreachable, RecordUnavailable, Superseded
from browservm.cluster.record import Record, Vm
from browservm.errors import BrowserVMError
from browservm.secretfile import read_existing

log = logging.getLogger("browservm.agent")

NAMESPACE = "browservm"  # Ray namespace of the agents
LABEL = "browservm.host"  # the Ray node label naming the host a node runs on
_CALL_TIMEOUT = 60.0
T = TypeVar("T")


def agent_name(host: str) -> str:
    return f"agent-{host}"


@dataclass(frozen=True)
class AgentConfig:
    """What a host's agent needs; Ray keeps it with the actor, so it holds no secret, only the password's file."""

    host: str
    conninfo: str
    password_file: Path | None
    capacity: int
    viewer_address: str
    vms: Callable[[AgentConfig], HostVms]  # makes the host's VMs (its controller) inside the actor
    heartbeat_s: float = 2.0
    settings: dict[str, Any] = field(default_factory=dict)  # the host controller's settings


class AgentActor:
    """The Ray actor. Its methods return data (dataclasses of ours cross Ray; exceptions of ours do not)."""

    def __init__(self, config: AgentConfig) -> None:
        configure_logs(config.settings.get("log_format", "text"))  # the host controller's, in Ray's worker log
        self._config = config
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._agent: HostAgent | None = None
        self._thread = threading.Thread(target=self._run, name="host-agent", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException:
            # A process whose agent stopped must not look alive: Ray restarts an actor whose process ended.
            log.exception("host %s: the agent stopped", self._config.host)
            os._exit(1)

    async def _main(self) -> None:
        config = self._config
        password = None if config.password_file is None else read_existing(config.password_file,
                                                                               "the cluster's password").strip()
        vms = config.vms(config)
        await vms.start()
        record = await self._connect(config, password)
        agent = HostAgent(config.host, record, vms, capacity=config.capacity, viewer_address=config.viewer_address)
        while True:
            try:
                await agent.register()
                break
            except RecordUnavailable as error:
                log.warning("host %s: %s; registering again in %s s", config.host, error, config.heartbeat_s)
                await asyncio.sleep(config.heartbeat_s)  # the database's return has no event to await
        self._agent = agent
        self._ready.set()
        while True:
            await asyncio.sleep(config.heartbeat_s)  # a heartbeat is a period, not a condition
            try:
                for action in await agent.tick():
                    log.info("host %s: %s", config.host, action)
            except RecordUnavailable as error:
                log.warning("host %s: heartbeat: %s", config.host, error)
            except Superseded as superseded:
                # Ray may still count this process as the actor (then it starts a new one, which registers):
                # either way this one must write nothing more, now.
                log.warning("%s", superseded)
                os._exit(1)
            except Exception:  # a VM that would not go, say: the next heartbeat settles again
                log.exception("host %s: settling the record against the host", config.host)

    @staticmethod
    async def _connect(config: AgentConfig, password: str | None) -> Record:
        while True:
            try:
                return await asyncio.to_thread(Record, config.conninfo, password=password)
            except RecordUnavailable as error:
                log.warning("host %s: %s; trying again in %s s", config.host, error, config.heartbeat_s)
                await asyncio.sleep(config.heartbeat_s)

    def _on_loop(self, work: Callable[[HostAgent], Coroutine[Any, Any, T]]) -> T:
        if not self._ready.wait(_CALL_TIMEOUT):
            raise RuntimeError(f"host {self._config.host}: its agent has not registered within {_CALL_TIMEOUT} s "
                               "(its log says why: the cluster's database unreachable?)")
        assert self._agent is not None
        agent = self._agent
        try:
            return asyncio.run_coroutine_threadsafe(work(agent), self._loop).result(_CALL_TIMEOUT)
        except BrowserVMError as error:
            # Ray pickles what a call raises; ours take other arguments than their message, so they would
            # not unpickle at the front. Their words cross, as Ray's error of the call.
            raise RuntimeError(f"{type(error).__name__}: {error}") from None

    def ping(self) -> dict[str, Any]:
        return self._on_loop(_ping)

    def create(self, reservation: str, request: dict[str, Any]) -> Refusal | Vm:
        return self._on_loop(lambda agent: agent.create(reservation, request))

    def destroy(self, vm_id: str) -> None:
        self._on_loop(lambda agent: agent.destroy(vm_id))

    def describe(self, vm_id: str) -> dict[str, Any]:
        return self._on_loop(lambda agent: agent.describe(vm_id))

    def describe_all(self) -> dict[str, dict[str, Any]]:
        return self._on_loop(lambda agent: agent.describe_all())

    def viewer(self, vm_id: str) -> dict[str, Any]:
        return self._on_loop(lambda agent: agent.viewer(vm_id))


async def _ping(agent: HostAgent) -> dict[str, Any]:
    return {"host": agent.name, "epoch": agent.epoch, "capacity": agent.capacity, "pid": os.getpid()}


def start_agent(config: AgentConfig) -> None:
    """Start the host's agent on its node, or leave the one running: Ray restarts it from now on."""
    actor = ray.remote(AgentActor).options(
        name=agent_name(config.host), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=0, max_concurrency=64, num_cpus=0,
        label_selector={LABEL: config.host})
    actor.remote(config)


class Agents:
    """A front's way to the host agents: each call with a deadline; no agent, a dead one or no answer is
    HostUnreachable, an agent that answered with an error HostFailed (both HostError)."""

    def __init__(self, timeout: float = _CALL_TIMEOUT) -> None:
        self.timeout = timeout
        self._handles: dict[str, Any] = {}  # Ray's handle of each host's agent (a restarted actor keeps it)

    def _handle(self, host: str) -> Any:
        handle = self._handles.get(host)
        if handle is None:
            try:
                handle = ray.get_actor(agent_name(host), namespace=NAMESPACE)
            except ValueError:
                raise HostUnreachable(host, "it has no agent in the cluster (was `browservm host join` run "
                                            "there?)") from None
            self._handles[host] = handle
        return handle

    def call(self, host: str, method: str, *args: Any, timeout: float | None = None) -> Any:
        handle = self._handle(host)
        try:
            return ray.get(getattr(handle, method).remote(*args), timeout=timeout or self.timeout)
        except ray.exceptions.GetTimeoutError:
            raise HostUnreachable(host, f"its agent did not answer {method} within {timeout or self.timeout} s") \
                from None
        except ray.exceptions.RayActorError as error:
            # An agent ended for good and joined again is another actor: look it up anew next time.
            self._handles.pop(host, None)
            raise HostUnreachable(host, f"its agent is not running ({_first_line(error)})") from None
        except ray.exceptions.RayTaskError as error:
            raise HostFailed(host, f"its agent failed {method}: {_cause(error)}") from None


def _cause(error: ray.exceptions.RayTaskError) -> str:
    """The agent's own words (RuntimeError's message), not Ray's traceback around them."""
    cause = error.cause if isinstance(error.cause, BaseException) else error
    return _first_line(cause)


def _first_line(error: BaseException) -> str:
    with contextlib.suppress(IndexError):
        return str(error).strip().splitlines()[0][:300]
    return type(error).__name__
