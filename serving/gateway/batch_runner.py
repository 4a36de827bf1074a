"""Runs batches (serving.gateway.batches) in a gateway replica, each on the replica that holds its lease.

Every gateway replica looks for batches to run every batches.poll_s and takes the lease of those nobody
holds (at most batches.max_running at once). The lease is renewed every third of batches.lease_s; a
replica that dies lets it lapse and another one resumes the batch from its last checkpoint.

A batch's lines go to the model deployments the way interactive requests do (serving.gateway.routes
.serve_line: through Ray Serve, so every replica of the model takes part) at vLLM priority
batches.priority, at most batches.max_in_flight per model from this replica; a line answered 503 (no
ready replica, overloaded) is tried again after a pause. Finished lines are checkpointed every
batches.checkpoint_lines lines or batches.checkpoint_s seconds: their output and error lines are written
to part files, then the parts and the counts are recorded in the batch's record, fenced by the lease. A
line is in the output once: a replica that lost its lease records nothing more, and what it wrote after
its last recorded checkpoint is run again by the next holder (a line killed mid-run may run twice on
the engine, never twice into the output).

Cancelling (or the completion window passing) stops new lines and aborts those in flight (their engine
requests end with them); the lines not done go to the error file as batch_cancelled (batch_expired).
Finally the parts are joined into the output and error files (ids derived from the batch's, so a
finalization that is interrupted and run again writes the same files).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
import uuid
from collections import Counter
from typing import Any

from serving.gateway import files
from serving.gateway.batches import (
    ACTIVE,
    CANCEL,
    ENDPOINTS,
    KIND,
    TERMINAL,
    Line,
    line_error,
    parse_input,
    usage_object,
)
from serving.gateway.errors import error_body
from serving.gateway.routes import serve_line
from serving.gateway.services import Services
from serving.gateway.specs import SPECS
from serving.gateway.store import StoreUnavailable

logger = logging.getLogger("serving.gateway.batches")

RETRY_WAITS_S = (1.0, 2.0, 4.0, 8.0, 15.0)  # a line answered 503 is tried again after each of these
SWEEP_EVERY_S = 300.0  # how often a replica deletes the bytes of expired files
UNRUN = {"cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
         "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
         "revoked": ("invalid_api_key", "The batch's API key was revoked or expired before this request ran.")}
ENDINGS = {"cancelled": "cancelled", "expired": "expired", "revoked": "cancelled"}  # stop reason -> final status
MAX_ATTEMPTS = 3  # runs of a batch that end in an unexpected error before it is failed
KEY_CHECK_S = 5.0  # how often a running batch checks that its API key is still valid


class _Ended(Exception):
    """The batch was ended (failed) on the way: nothing more to do in this run."""


class LeaseLost(Exception):
    """Another replica holds the batch now: this one stops and records nothing more."""


class BatchRunner:
    """The batches this gateway replica runs. `start` begins looking for batches (create_app's lifespan);
    `wake` looks at once (a batch was created or cancelled here)."""

    def __init__(self, svc: Services):
        self.svc = svc
        self.holder = uuid.uuid4().hex  # this replica's name on the leases it takes
        self.running: dict[str, asyncio.Task] = {}  # "<owner>/<batch id>" -> its job
        self.jobs: dict[str, BatchJob] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}  # model -> lines in flight at it
        self._loop: asyncio.Task | None = None
        self._woken = asyncio.Event()
        self._stopping = False
        self._swept = 0.0
        self.pending: Counter[str] = Counter()  # model -> lines not finished, for the gauge
        self.in_flight: Counter[str] = Counter()  # model -> lines at its engine now

    def start(self) -> None:
        if not self._stopping and (self._loop is None or self._loop.done()):
            self._loop = asyncio.get_running_loop().create_task(self._run())

    def wake(self) -> None:
        self.start()
        self._woken.set()

    async def stop(self) -> None:
        """Stop looking and stop every batch here (their leases are dropped, so another replica resumes them
        at once)."""
        # a flag, not only the cancel: asyncio.wait_for (3.11) swallows a cancel that meets its wake-up
        self._stopping = True
        tasks = [t for t in (self._loop, *self.running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._stopping = False  # a later start() may run it again (tests; a lifespan runs once)

    def slot(self, model: str) -> asyncio.Semaphore:
        if model not in self._slots:
            self._slots[model] = asyncio.Semaphore(self.svc.config.batches.max_in_flight)
        return self._slots[model]

    def count_pending(self, model: str, change: int) -> None:
        self.pending[model] += change
        self.svc.metrics.batch_lines_pending.set(self.pending[model], {"model": model})

    def count_in_flight(self, model: str, change: int) -> None:
        self.in_flight[model] += change
        self.svc.metrics.batch_lines_in_flight.set(self.in_flight[model], {"model": model})

    def label(self, line: Line) -> str:
        """The model label of a line's metrics: a served model's name, else "unknown" (bounded labels)."""
        model = line.body.get("model")
        return model if isinstance(model, str) and self.svc.config.model(model) is not None else "unknown"

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.scan()
                if time.monotonic() - self._swept > SWEEP_EVERY_S:
                    self._swept = time.monotonic()
                    await self.sweep()
            except StoreUnavailable:
                pass  # Redis away: look again later
            except Exception:
                logger.exception("looking for batches failed")
            self._woken.clear()
            try:
                async with asyncio.timeout(self.svc.config.batches.poll_s):
                    await self._woken.wait()
            except TimeoutError:
                pass

    async def scan(self) -> None:
        """Take the lease of batches to run that nobody holds, up to batches.max_running here; tell the jobs
        of batches being cancelled."""
        config = self.svc.config.batches
        for member in fair_order(await self.svc.store.call("index_range", ACTIVE, newest_first=False)):
            if member in self.running:
                self.jobs[member].poke()
                continue
            if len(self.running) >= config.max_running:
                break
            if await self.svc.store.call("lease_take", _lease(member), self.holder, config.lease_s):
                owner, _, batch_id = member.partition("/")
                job = BatchJob(self, owner, batch_id)
                self.jobs[member] = job
                self.running[member] = task = asyncio.get_running_loop().create_task(job.run())
                task.add_done_callback(functools.partial(self._ended, member))

    def _ended(self, member: str, _: asyncio.Task) -> None:
        self.running.pop(member, None)
        self.jobs.pop(member, None)

    async def sweep(self) -> None:
        """Delete the bytes of expired files (of every owner that has files)."""
        for owner in await self.svc.store.call("index_range", files.OWNERS):
            await files.sweep(self.svc, owner)


def fair_order(members: list[str]) -> list[str]:
    """Active batches ("<owner>/<id>", oldest first) taken in turn from each owner: every key's oldest batch,
    then every key's second, ...; a key with many batches does not keep another's waiting behind them."""
    queues: dict[str, list[str]] = {}
    for member in members:
        queues.setdefault(member.partition("/")[0], []).append(member)
    order = []
    for depth in range(max((len(q) for q in queues.values()), default=0)):
        order += [q[depth] for q in queues.values() if depth < len(q)]
    return order


def _lease(member: str) -> str:
    return f"batch:{member.partition('/')[2]}"


def _ranges(indexes: list[int]) -> list[list[int]]:
    """Sorted indexes as [[first, last], ...] runs (how a checkpoint records its lines)."""
    runs: list[list[int]] = []
    for i in sorted(indexes):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


def _derived_id(batch_id: str, which: str, at_s: int) -> str:
    """An output file's id: the same on every run of the batch's finalization (it overwrites, never adds),
    ordered by the time finalization began, as every file id is by its creation (files.new_id)."""
    return files.new_id("file-", at_ns=at_s * 1_000_000_000,
                        suffix=hashlib.sha256(f"{batch_id}/{which}".encode()).hexdigest()[:16])


class BatchJob:
    """One batch run by this replica while it holds the lease."""

    def __init__(self, runner: BatchRunner, owner: str, batch_id: str):
        self.runner, self.svc = runner, runner.svc
        self.owner, self.batch_id = owner, batch_id
        self.member = f"{owner}/{batch_id}"
        self.record: dict[str, Any] = {}
        self.stop_reason: str | None = None  # "cancelled" | "expired"
        self.done: list[tuple[Line, bool, str, dict[str, int] | None]] = []  # finished, not checkpointed
        self.in_flight: set[asyncio.Task] = set()
        self.left: Counter[str] = Counter()  # model label -> lines of this run not finished
        self.closing = False  # the checkpoint loop ends after its current checkpoint
        self.key_checked = time.monotonic()
        self._poked = asyncio.Event()

    def poke(self) -> None:
        self._poked.set()

    async def run(self) -> None:
        renewing = asyncio.get_running_loop().create_task(self._renew(asyncio.current_task()))
        try:
            await self._run()
        except LeaseLost:
            logger.warning("batch %s: lease lost, another replica resumes it", self.batch_id)
        except StoreUnavailable:
            logger.warning("batch %s: store unavailable, resumed later", self.batch_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # tried again by the next holder, up to MAX_ATTEMPTS runs
            logger.exception("batch %s failed", self.batch_id)
            await self._attempt_failed(exc)
        finally:
            renewing.cancel()
            for task in self.in_flight:
                task.cancel()
            await asyncio.gather(renewing, *self.in_flight, return_exceptions=True)
            try:
                await self.svc.store.call("lease_drop", _lease(self.member), self.runner.holder)
            except StoreUnavailable:
                pass

    async def _renew(self, main: asyncio.Task | None) -> None:
        config = self.svc.config.batches
        while True:
            await asyncio.sleep(config.lease_s / 3)
            try:
                held = await self.svc.store.call("lease_take", _lease(self.member), self.runner.holder, config.lease_s)
            except StoreUnavailable:
                continue  # a Redis blip: the lease has two more renewals before it lapses
            if not held and main is not None:
                main.cancel()  # stop at once; nothing more is recorded (the fence refuses it anyway)
                return

    async def _run(self) -> None:
        found = (await self.svc.store.call("record_get", KIND, self.owner, [self.batch_id]))[0]
        if found is None:
            await self.svc.store.call("index_remove", ACTIVE, self.member)
            return
        self.record = json.loads(found)
        batch = self.record["batch"]
        if batch["status"] in TERMINAL:
            await self.svc.store.call("index_remove", ACTIVE, self.member)
            return
        if batch["status"] != "finalizing":
            if batch["status"] == "validating":
                batch.update(status="in_progress", in_progress_at=int(time.time()))
                await self._commit()
            try:
                await self._work()
            except _Ended:
                return
        await self._finalize()

    async def _attempt_failed(self, exc: Exception) -> None:
        """Count a run that ended in an unexpected error; the batch fails after MAX_ATTEMPTS of them (instead of
        holding a runner slot for ever), with what it finished so far in its files."""
        if not self.record:
            return
        self.record["attempts"] = self.record.get("attempts", 0) + 1
        try:
            if self.record["attempts"] < MAX_ATTEMPTS:
                await self._commit()
            else:
                await self._fail("internal_error", "The batch could not be run; the requests it finished are in its "
                                                   f"files ({type(exc).__name__}).")
        except (LeaseLost, StoreUnavailable):
            pass

    async def _fail(self, code: str, message: str) -> None:
        """End the batch `failed` with one error (OpenAI's `errors`), its finished lines in its files."""
        batch = self.record["batch"]
        batch["errors"] = {"object": "list", "data": [{"code": code, "message": message, "param": None,
                                                       "line": None}]}
        self.record["ending"] = "failed"
        await self._finalize()

    async def _work(self) -> None:
        try:
            data = await self.svc.files.get(self.record["input_path"])
        except FileNotFoundError:  # the storage lost the batch's own copy of its input
            await self._fail("input_file_missing", "The batch's input is no longer in the file storage.")
            raise _Ended() from None
        # validated when the batch was created: every line parses. A worker thread: the loop serves meanwhile
        lines, _ = await asyncio.to_thread(parse_input, data, 1 << 62)
        done = self._recorded()
        pending = [line for line in lines if line.index not in done]
        self.left = Counter(self.runner.label(line) for line in pending)
        for model, count in self.left.items():
            self.runner.count_pending(model, count)
        principal = await self.svc.auth.principal_of(self.owner)
        checkpoints = asyncio.get_running_loop().create_task(self._checkpoints())
        try:
            await self._check_stop()
            for line in pending:
                if self.stop_reason is not None or checkpoints.done():
                    break
                await self._start(line, principal)
            while self.in_flight and self.stop_reason is None and not checkpoints.done():
                await asyncio.wait({*self.in_flight, checkpoints}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in self.in_flight:
                task.cancel()
            await asyncio.gather(*self.in_flight, return_exceptions=True)
            self.closing = True
            self._poked.set()
            for model, count in self.left.items():
                self.runner.count_pending(model, -count)
            await checkpoints  # its checkpoint in progress ends first; raises what stopped it (LeaseLost)
        if self.stop_reason is not None:
            finished = self._recorded() | {line.index for line, *_ in self.done}
            code, message = UNRUN[self.stop_reason]
            for line in lines:
                if line.index not in finished:
                    self.done.append((line, False, _line(line, error={"code": code, "message": message}), None))
        await self._checkpoint()

    def _recorded(self) -> set[int]:
        """The input lines whose results the batch's checkpoints hold."""
        return {i for part in self.record["parts"] for first, last in part["lines"] for i in range(first, last + 1)}

    async def _start(self, line: Line, principal) -> None:
        """Start one line when its model has a free slot (waiting for one meanwhile)."""
        model = self.runner.label(line)
        slot = self.runner.slot(model)
        await slot.acquire()
        if self.stop_reason is not None:
            slot.release()
            return
        task = asyncio.get_running_loop().create_task(self._one(line, principal, model))
        self.in_flight.add(task)
        self.runner.count_in_flight(model, 1)

        def finished(task: asyncio.Task) -> None:
            self.in_flight.discard(task)
            slot.release()
            self.runner.count_in_flight(model, -1)

        task.add_done_callback(finished)

    async def _one(self, line: Line, principal, model: str) -> None:
        endpoint = self.record["batch"]["endpoint"]
        route = ENDPOINTS[endpoint]
        request_id = str(uuid.uuid4())
        refused = line_error(line, endpoint)
        if refused is not None:
            status, message, param, code = refused
            body = json.dumps(error_body(status, message, param=param, code=code)).encode()
        elif principal is None:  # the key was revoked or expired since the batch was created
            status, body = 401, json.dumps(error_body(401, "The API key of this batch is no longer valid.",
                                                      code="invalid_api_key")).encode()
        else:
            status, body = await self._serve(route, line, principal, request_id)
        ok = 200 <= status < 300
        answer = json.loads(body) if body else None
        usage = SPECS[route].usage(answer) if ok and isinstance(answer, dict) else None
        response = {"status_code": status, "request_id": request_id, "body": answer}
        self.done.append((line, ok, _line(line, response=response), usage))
        self.left[model] -= 1
        self.runner.count_pending(model, -1)
        self.svc.metrics.batch_lines.inc(1, {"model": model, "result": "completed" if ok else "failed"})
        if len(self.done) >= self.svc.config.batches.checkpoint_lines:
            self._poked.set()

    async def _serve(self, route, line: Line, principal, request_id: str) -> tuple[int, bytes]:
        """The line's answer, tried again while the model answers 503; any failure is the line's own (500),
        never one that loses the line."""
        for wait in RETRY_WAITS_S:
            status, body = await self._attempt(route, line, principal, request_id)
            if status != 503 or self.stop_reason is not None:
                return status, body
            await asyncio.sleep(wait)
        return await self._attempt(route, line, principal, request_id)

    async def _attempt(self, route, line: Line, principal, request_id: str) -> tuple[int, bytes]:
        try:  # serve_line changes the body it is given: each attempt gets a copy
            return await serve_line(route, json.loads(json.dumps(line.body)), principal, self.svc,
                                    priority=self.svc.config.batches.priority, request_id=request_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug of an engine adapter: the line fails, the batch goes on
            logger.exception("batch %s: line %s failed", self.batch_id, line.custom_id)
            return 500, json.dumps(error_body(500, "internal error")).encode()

    async def _checkpoints(self) -> None:
        """Checkpoint every checkpoint_s (sooner when checkpoint_lines are waiting); look for a cancel."""
        while not self.closing:
            try:
                async with asyncio.timeout(self.svc.config.batches.checkpoint_s):
                    await self._poked.wait()
            except TimeoutError:
                pass
            self._poked.clear()
            if self.closing:
                return  # the run checkpoints what is left itself
            await self._check_stop()
            if self.stop_reason is not None:
                for task in self.in_flight:
                    task.cancel()
            await self._checkpoint()

    async def _check_stop(self) -> None:
        if self.stop_reason is not None:
            return
        flag = (await self.svc.store.call("record_get", CANCEL, self.owner, [self.batch_id]))[0]
        if flag is not None:
            self.stop_reason = "cancelled"
            self.record["batch"].update(status="cancelling", cancelling_at=int(flag))
        elif time.time() >= self.record["batch"]["expires_at"]:
            self.stop_reason = "expired"
        elif time.monotonic() - self.key_checked >= KEY_CHECK_S:
            self.key_checked = time.monotonic()
            if await self.svc.auth.principal_of(self.owner) is None:
                self.stop_reason = "revoked"
                self.record["batch"].update(status="cancelling", cancelling_at=int(time.time()))

    async def _checkpoint(self) -> None:
        """Write the finished lines to part files, then record them (fenced by the lease)."""
        if not self.done:
            return
        taken, self.done = self.done, []
        part = uuid.uuid4().hex
        paths: dict[str, str | None] = {}
        for kind, ok in (("out", True), ("err", False)):
            text = "".join(text + "\n" for _, good, text, _ in taken if good is ok)
            paths[kind] = self.svc.files.path("batches", self.batch_id, f"{part}.{kind}.jsonl") if text else None
            if text:
                await self.svc.files.put(str(paths[kind]), text.encode())
        completed = sum(1 for _, ok, _, _ in taken if ok)
        usages = [u for *_, u in taken if u]
        usage = {"input_tokens": sum(u["prompt_tokens"] for u in usages),
                 "output_tokens": sum(u["completion_tokens"] for u in usages)}
        self.record["parts"].append({**paths, "lines": _ranges([line.index for line, *_ in taken]),
                                     "completed": completed, "failed": len(taken) - completed, "usage": usage})
        counts = self.record["batch"]["request_counts"]
        counts["completed"] += completed
        counts["failed"] += len(taken) - completed
        before = self.record["batch"].get("usage") or usage_object(0, 0)
        self.record["batch"]["usage"] = usage_object(before["input_tokens"] + usage["input_tokens"],
                                                     before["output_tokens"] + usage["output_tokens"])
        try:
            await self._commit()
        except LeaseLost:
            for path in paths.values():
                if path:
                    await self.svc.files.delete(path)
            raise

    async def _commit(self) -> None:
        written = await self.svc.store.call("record_put_fenced", KIND, self.owner, self.batch_id,
                                            json.dumps(self.record).encode(), _lease(self.member), self.runner.holder)
        if not written:
            raise LeaseLost(self.batch_id)

    async def _finalize(self) -> None:
        """Join the parts into the output and error files; the batch ends completed, cancelled or expired."""
        batch = self.record["batch"]
        end = self.record.get("ending") or ENDINGS.get(self.stop_reason or "", "completed")
        if batch["status"] != "finalizing":
            batch.update(status="finalizing", finalizing_at=int(time.time()))
            self.record["ending"] = end
            await self._commit()
        end = self.record.get("ending", end)
        for kind, field in (("out", "output_file_id"), ("err", "error_file_id")):
            sources = [part[kind] for part in self.record["parts"] if part.get(kind)]
            batch[field] = await self._output_file(kind, sources) if sources else None
        now = int(time.time())
        batch.update(status=end, **{f"{end}_at": now})
        await self._commit()
        await self.svc.store.call("index_remove", ACTIVE, self.member)
        await self.svc.files.delete(self.svc.files.path("batches", self.batch_id), recursive=True)

    async def _output_file(self, kind: str, sources: list[str]) -> str:
        file_id = _derived_id(self.batch_id, kind, self.record["batch"]["finalizing_at"])
        path = self.svc.files.path(self.owner, file_id)
        size = await self.svc.files.concat(path, sources)
        created_at = int(time.time())
        name = f"{self.batch_id}_{'output' if kind == 'out' else 'error'}.jsonl"
        file = files.file_object(file_id, size, created_at, name, "batch_output",
                                 created_at + self.record["output_expires_s"])
        await files.save_record(self.svc, self.owner, {"file": file, "path": path})
        return file_id


def _line(line: Line, *, response: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> str:
    """A line of the output or error file (OpenAI's batch output format)."""
    return json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id, "response": response,
                       "error": error}, separators=(",", ":"))
