"""The engine-core process (`python -m kvserve.engine.core_proc`) and the API server's client for it.

The process runs EngineCore's schedule / execute / update loop and nothing else: between steps it drains the input
socket (new requests, finishes, utility calls, all batched by the client per event-loop turn) and after each step
sends one Outputs message. It is started with its EngineArgs as JSON on stdin (never argv: the KV store key may be
in them), exits when the API server's process is gone, and on a Shutdown message writes queued KV saves first.

MPCoreClient (in the API server) makes a private temp dir for the sockets, starts the process, watches it, and
restarts it (bounded, logged) when it dies. Each core binds its own input socket (input-<epoch>), so requests queued
for a dead core are dropped with its socket, and tags its outputs with its epoch, so nothing from a dead one is used.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import msgspec
import zmq

from kvserve.engine.ipc import (
    AddRequests,
    Codec,
    FinishRequests,
    Outputs,
    Ready,
    Rejected,
    Shutdown,
    UtilityCall,
    UtilityResult,
    input_codec,
    output_codec,
)
from kvserve.engine.protocol import EngineCoreRequest, EngineDeadError

log = logging.getLogger("kvserve.engine")


def input_address(ipc_dir: str, epoch: int) -> str:
    return f"ipc://{ipc_dir}/input-{epoch}"


# --------------------------------------------------------------------------------------------- the core process
def run_core(args, ipc_dir: str, epoch: int, parent_pid: int) -> int:
    from kvserve.core.request import RequestStatus
    from kvserve.engine.core import EngineCore
    from kvserve.sampling import ParamError

    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(input_address(ipc_dir, epoch))  # per process: nothing queued for a dead one reaches this one
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(f"ipc://{ipc_dir}/output")
    codec_in, codec_out = input_codec(), output_codec()
    core = EngineCore(args)
    outbox.send(codec_out.encode(Ready(epoch, core.info)))
    log.info("engine core %d ready (pid %d): %s, %d KV tokens", epoch, os.getpid(), core.info.model_name,
             core.info.kv_capacity_tokens)

    def utility(msg: UtilityCall) -> UtilityResult:
        if msg.method == "stats":
            stats = msgspec.structs.replace(core.stats(), ipc_frames_dropped=codec_in.dropped)
            return UtilityResult(epoch, msg.call_id, stats=stats)
        if msg.method == "release_session" and msg.session is not None:
            return UtilityResult(epoch, msg.call_id, count=core.release_session(msg.session))
        if msg.method == "kv_summary":
            return UtilityResult(epoch, msg.call_id, summary=core.kv_summary(msg.since))
        return UtilityResult(epoch, msg.call_id, value=core.reset_prefix_cache())

    def handle(msg) -> bool:
        """False on Shutdown."""
        if isinstance(msg, AddRequests):
            for request in msg.requests:
                try:
                    core.add_request(request)
                except ParamError as e:
                    outbox.send(codec_out.encode(Rejected(epoch, request.request_id, str(e), e.param, e.code)))
        elif isinstance(msg, FinishRequests):
            core.finish_requests(msg.ids, RequestStatus.FINISHED_STOPPED if msg.stopped else
                                 RequestStatus.FINISHED_ABORTED)
        elif isinstance(msg, UtilityCall):
            try:
                result = utility(msg)
            except Exception as e:  # noqa: BLE001 - a failed query is the caller's error, not the engine's death
                log.exception("utility call %s failed", msg.method)
                result = UtilityResult(epoch, msg.call_id, error=f"{msg.method} failed: {e}")
            outbox.send(codec_out.encode(result))
        elif isinstance(msg, Shutdown):
            return False
        return True

    running = True
    try:
        while running:
            if os.getppid() != parent_pid:
                log.warning("the API server (pid %d) is gone; engine core exits", parent_pid)
                break
            # block (a while, to notice a dead parent) only when there is nothing to step
            timeout = 0 if core.has_unfinished_requests() else 1000
            while running and inbox.poll(timeout):
                msg = codec_in.decode(inbox.recv(copy=False).buffer)
                if msg is None:
                    log.warning("dropped a malformed or oversized IPC frame (%d so far)", codec_in.dropped)
                else:
                    running = handle(msg)
                timeout = 0
            if running and core.has_unfinished_requests():
                step = core.step()
                if step.updates:
                    outbox.send(codec_out.encode(Outputs(epoch, step)))
    finally:
        core.close()
        outbox.close(linger=1000)
        inbox.close(linger=0)
        ctx.term()
    return 0


def main(argv: list[str] | None = None) -> int:
    from kvserve.engine.core import EngineArgs

    parser = argparse.ArgumentParser(prog="kvserve-engine-core")
    parser.add_argument("--ipc-dir", required=True)
    parser.add_argument("--epoch", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, opts.log_level.upper(), logging.INFO),
                        format="%(levelname)s %(asctime)s %(name)s[core]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the API server decides
    args = msgspec.json.decode(sys.stdin.buffer.read(), type=EngineArgs)
    return run_core(args, opts.ipc_dir, opts.epoch, opts.parent_pid)


# --------------------------------------------------------------------------------------------- the client
class MPCoreClient:
    """The engine core in its own process. Calls come from the event loop; events go back on it."""

    def __init__(self, args, max_restarts: int = 3, log_level: str = "info", death_poll_s: float = 0.2):
        self.args = args
        self.max_restarts = max_restarts
        self.log_level = log_level
        self.death_poll_s = death_poll_s
        self.epoch = 0
        self.proc: subprocess.Popen | None = None
        self._dir = tempfile.mkdtemp(prefix="kvserve-ipc-")  # mode 0700: only this user can connect
        self._ctx = None
        self._in = self._out = None
        self._codec_in: Codec = input_codec()
        self._codec_out: Codec = output_codec()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events = None
        self._tasks: list[asyncio.Task] = []
        self._pending_adds: list[EngineCoreRequest] = []
        self._pending_finish: dict[bool, list[str]] = {True: [], False: []}
        self._flush_scheduled = False
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = 0
        self._ever_ready = False
        self._ready_epoch = -1
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop, events) -> None:
        import zmq.asyncio

        self._loop, self._events = loop, events
        self._ctx = zmq.asyncio.Context()
        self._out = self._ctx.socket(zmq.PULL)  # from every core this client starts
        self._out.bind(f"ipc://{self._dir}/output")
        self._spawn()
        self._tasks = [loop.create_task(self._read_outputs()), loop.create_task(self._watch())]

    def _spawn(self) -> None:
        self.epoch += 1
        cmd = [sys.executable, "-m", "kvserve.engine.core_proc", "--ipc-dir", self._dir, "--epoch", str(self.epoch),
               "--parent-pid", str(os.getpid()), "--log-level", self.log_level]
        if self._in is not None:
            self._in.close(linger=0)  # drop whatever was queued for the dead core
        self._in = self._ctx.socket(zmq.PUSH)  # to this core; connects once it has bound (it then says Ready)
        self._in.setsockopt(zmq.SNDHWM, 0)  # no high-water mark: a NOBLOCK send must never fail with EAGAIN
        self._in.connect(input_address(self._dir, self.epoch))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, start_new_session=True)
        self.proc.stdin.write(msgspec.json.encode(dataclasses.asdict(self.args)))
        self.proc.stdin.close()
        log.info("started engine core %d (pid %d)", self.epoch, self.proc.pid)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Ask the core to stop (it writes queued KV saves first), then make sure it is gone."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                await self._in.send(self._codec_in.encode(Shutdown()))
            except zmq.ZMQError:
                pass
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                log.warning("engine core did not exit in %.0fs; killing it", timeout)
                proc.kill()
                proc.wait(10)
        self._fail_calls("the server is shutting down")
        for sock in (self._in, self._out):
            if sock is not None:
                sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ------------------------------------------------------------------ calls (batched per event-loop turn)
    def add(self, request: EngineCoreRequest) -> None:
        self._pending_adds.append(request)
        self._schedule_flush()

    def finish(self, ids: list[str], stopped: bool) -> None:
        self._pending_finish[stopped].extend(ids)
        self._schedule_flush()

    async def call(self, method: str, *args):
        if self._ready_epoch != self.epoch:
            raise EngineDeadError("the engine core is not running")
        self._call_ids += 1
        future = self._loop.create_future()
        self._calls[self._call_ids] = future
        session = args[0] if method == "release_session" else None
        since = args[0] if method == "kv_summary" else None
        await self._in.send(self._codec_in.encode(UtilityCall(self._call_ids, method, session, since)))
        return await future

    def send_raw(self, frame: bytes) -> None:
        """Put bytes on the core's input socket as they are (tests: a malformed frame must be dropped, not run)."""
        self._loop.create_task(self._in.send(frame))

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._ready_epoch != self.epoch:  # no live core: AsyncLLM replays what is still wanted on ready
            self._pending_adds.clear()
            self._pending_finish = {True: [], False: []}
            return
        frames = []
        if self._pending_adds:
            frames.append(self._codec_in.encode(AddRequests(self._pending_adds)))
            self._pending_adds = []
        for stopped, ids in self._pending_finish.items():
            if ids:
                frames.append(self._codec_in.encode(FinishRequests(ids, stopped)))
        self._pending_finish = {True: [], False: []}
        for frame in frames:  # SNDHWM 0 (see _spawn): sends queue, never block or fail
            self._in.send(frame, flags=zmq.NOBLOCK)

    # ------------------------------------------------------------------ background tasks
    async def _read_outputs(self) -> None:
        while True:
            frame = await self._out.recv(copy=False)
            msg = self._codec_out.decode(frame.buffer)
            if msg is None:
                log.warning("dropped a malformed engine-core frame")
                continue
            if msg.epoch != self.epoch:
                continue  # from a core that died since
            try:
                self._dispatch(msg)
            except Exception:  # noqa: BLE001 - one bad output must not stop every stream
                log.exception("failed to process engine-core output")

    def _dispatch(self, msg) -> None:
        if isinstance(msg, Outputs):
            self._events.outputs(msg.step)
        elif isinstance(msg, Ready):
            self._ready_epoch = msg.epoch
            self._ever_ready = True
            self._events.ready(msg.info)
        elif isinstance(msg, Rejected):
            self._events.rejected(msg)
        elif isinstance(msg, UtilityResult):
            future = self._calls.pop(msg.call_id, None)
            if future is not None and not future.done():
                if msg.error is not None:
                    future.set_exception(RuntimeError(msg.error))
                else:
                    future.set_result(msg.stats if msg.stats is not None else
                                      msg.summary if msg.summary is not None else
                                      msg.count if msg.count is not None else msg.value)

    async def _watch(self) -> None:
        """Notice a dead core within death_poll_s; restart it unless it never came up or restarts are used up."""
        restarts = 0
        while True:
            await asyncio.sleep(self.death_poll_s)
            code = self.proc.poll()
            if code is None or self._closing:
                continue
            reason = f"engine core {self.epoch} (pid {self.proc.pid}) exited with {_describe(code)}"
            self._ready_epoch = -1
            self._fail_calls(reason)
            restart = self._ever_ready and restarts < self.max_restarts
            log.error("%s; %s", reason, f"restarting ({restarts + 1}/{self.max_restarts})" if restart
                      else "not restarting")
            self._events.died(reason, restart)
            if not restart:
                return
            restarts += 1
            self._spawn()

    def _fail_calls(self, reason: str) -> None:
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        self._calls.clear()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


if __name__ == "__main__":
    sys.exit(main())
