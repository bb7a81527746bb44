"""``fhir-ner backfill`` and ``fhir-ner reprocess``: existing notes into the pipeline the subscriptions feed.

Finding notes (:class:`ExportSource`, :class:`SearchSource`):

* FHIR Bulk Data ``$export`` (system level, or Group level with ``--group``), ``_type=DocumentReference`` and
  ``_since``: kick-off with ``Prefer: respond-async``, status polling that honours ``Retry-After``, each NDJSON
  file streamed line by line. The status URL and every file URL must lie under the EHR base URL, as every URL
  the workers fetch. An EHR that answers the kick-off with 400/404/405/501 has no ``$export``: the run pages
  through search instead.
* Search: ``DocumentReference?date=ge{since}&date=lt{until}[&patient=...]&_sort=date&_count=N``, following the
  EHR's ``next`` links (which must stay under the base URL too).

Queueing them (:class:`Run`): each note found is classified as the receiver classifies a notification's note
(``core.intake.Intake.prepare``), then claimed by :meth:`core.backfill.BulkState.claim`, which queues its job at
the bulk priority, skips what is already processed or on its way (the receiver's claims and statuses), and
moves the run's position and counts in the same Redis script. Queued notes are spaced at ``--rate`` per second
(duplicates and skipped notes cost the pipeline nothing and are not paced); an HTTP 429 from the EHR halves the
pace (down to a sixteenth) and waits its ``Retry-After``; the pace creeps back after a quiet half minute.

One driver per run: a lock in Redis (refreshed while the run goes; a driver killed with ``kill -9`` leaves it to
expire in :data:`LOCK_SECONDS`). The same command again resumes from the position kept in the run's record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlencode

from core.backfill import BULK_PRIORITY, BulkState, FoundNote, RunKind
from core.deps import get_intake, get_redis
from core.intake import IntakeRejectedError
from core.jobs import TASK_PROCESS_NOTE, TASK_RETRACT_NOTE, celery_envelope
from core.origin import EhrBase
from core.settings import get_settings
from worker.ehr import EhrClient, EhrError
from worker.resilience import RetryPolicy, parse_retry_after

logger = logging.getLogger("fhir_ner.backfill")

LOCK_SECONDS = 10.0
RECORD_EVERY_SECONDS = 0.5
NO_EXPORT_STATUSES = (400, 403, 404, 405, 406, 410, 501)
SourceName = Literal["auto", "export", "search"]


class BackfillError(RuntimeError):
    """The run cannot go on (its state and position are kept; the same command resumes it)."""


# ---------------------------------------------------------------------------------------------- options
def parse_when(value: str | None) -> datetime | None:
    """``YYYY``, ``YYYY-MM-DD`` or an ISO date-time (UTC unless it says otherwise)."""
    if not value:
        return None
    text = value.strip()
    try:
        if len(text) == 4 and text.isdigit():
            return datetime(int(text), 1, 1, tzinfo=UTC)
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BackfillError(f"not a date: {value!r} (use YYYY-MM-DD or an ISO date-time)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_rate(value: str | float | None) -> float:
    """``20``, ``20/s``, ``1200/min`` → notes per second."""
    if value is None or value == "":
        return 10.0
    text = str(value).strip().lower()
    per = 1.0
    for suffix, seconds in (("/s", 1.0), ("/sec", 1.0), ("/m", 60.0), ("/min", 60.0), ("/h", 3600.0)):
        if text.endswith(suffix):
            text, per = text[: -len(suffix)], seconds
            break
    try:
        rate = float(text) / per
    except ValueError:
        raise BackfillError(f"--rate takes N/s (got {value!r})") from None
    if rate <= 0:
        raise BackfillError("--rate must be above 0")
    return rate


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class RunOptions:
    kind: RunKind = "backfill"
    since: datetime | None = None
    until: datetime | None = None
    patients: tuple[str, ...] = ()
    group: str | None = None
    rate: float = 10.0
    dry_run: bool = False
    source: SourceName = "auto"
    page_size: int = 100
    name: str | None = None
    fingerprint: str = ""  # reprocess: "model revision|profile fingerprint" that counts as up to date

    def params(self) -> dict[str, Any]:
        """What identifies the run (its name is a hash of these): not the rate, which may change on resume."""
        return {
            "kind": self.kind,
            "since": _instant(self.since) if self.since else None,
            "until": _instant(self.until) if self.until else None,
            "patients": sorted(self.patients),
            "group": self.group,
            "source": self.source,
            "fingerprint": self.fingerprint,
        }

    def run_name(self) -> str:
        if self.name:  # always starts with the kind: the workers tell a reprocessing run's notes by it
            return self.name if self.name.startswith(f"{self.kind}-") else f"{self.kind}-{self.name}"
        digest = hashlib.sha256(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.kind}-{digest}" + ("-dry-run" if self.dry_run else "")

    def wants(self, document: dict[str, Any]) -> bool:
        """The local filters (an export brings every note changed since ``_since``)."""
        if self.patients:
            subject = str((document.get("subject") or {}).get("reference") or "")
            if subject.rsplit("/", 1)[-1] not in self.patients:
                return False
        if self.since or self.until:
            written = parse_when_or_none(document.get("date"))
            if written is None:
                return False
            if self.since and written < self.since:
                return False
            if self.until and written >= self.until:
                return False
        return True


def parse_when_or_none(value: Any) -> datetime | None:
    try:
        return parse_when(str(value)) if value else None
    except BackfillError:
        return None


# ---------------------------------------------------------------------------------------------- pacing
class RateLimiter:
    """Queued notes at most ``rate`` per second, evenly spaced (no bursts); slowed by the EHR's 429s."""

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.configured = rate
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.next_at = clock()
        self.quiet_since = clock()
        self.throttles = 0

    def wait(self) -> None:
        """Block until the next note may be queued."""
        now = self.clock()
        if now - self.quiet_since > 30 and self.rate < self.configured:
            self.rate = min(self.configured, self.rate * 1.25)
            self.quiet_since = now
        if self.next_at > now:
            self.sleep(self.next_at - now)

    def charge(self) -> None:
        """A note was queued: the next one waits a full interval from now (or from the slot, if later)."""
        self.next_at = max(self.next_at, self.clock()) + 1.0 / self.rate

    def throttled(self, retry_after: float | None) -> float:
        """The EHR answered 429: halve the pace and wait what it asked (else a few seconds); returns the wait."""
        self.throttles += 1
        self.rate = max(self.configured / 16, self.rate / 2)
        self.quiet_since = self.clock()
        wait = retry_after if retry_after is not None else min(30.0, 2.0 * self.throttles)
        self.next_at = max(self.next_at, self.clock() + wait)
        return wait


# ---------------------------------------------------------------------------------------------- sources
class Source(Protocol):
    name: str

    def total(self) -> int | None: ...

    def documents(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """Each DocumentReference found, with the position that resumes after it."""
        ...


class ExportUnsupportedError(Exception):
    """The EHR has no $export for us (the run pages through search instead)."""


def _get(
    client: EhrClient,
    limiter: RateLimiter,
    path: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    final: tuple[int, ...] = (),
) -> Any:
    """One GET for the driver, waiting out the EHR's 429s (and slowing the run down) and transient errors."""
    failures = 0
    while True:
        try:
            response = client.respond("GET", path, headers=headers, params=params)
        except EhrError as error:
            if error.status_code == 400:  # outside the EHR base URL: never fetched
                raise
            response = None
            reason = str(error)
        if response is not None and response.status_code == 429:
            waited = limiter.throttled(parse_retry_after(response.headers.get("Retry-After")))
            logger.warning("EHR throttled the run (429), waiting %.1f s, pace now %.2f/s", waited, limiter.rate)
            limiter.sleep(waited)
            continue
        if response is not None and (response.status_code < 500 or response.status_code in final):
            return response
        failures += 1
        if response is not None:
            reason = f"HTTP {response.status_code}"
        if failures >= 6:
            raise BackfillError(f"the EHR keeps failing ({reason}); run the same command again to resume")
        limiter.sleep(RetryPolicy().delay(failures, response.headers.get("Retry-After") if response else None))


class SearchSource:
    name = "search"

    def __init__(self, client: EhrClient, limiter: RateLimiter, options: RunOptions, position: dict[str, Any] | None):
        self.client = client
        self.limiter = limiter
        self.options = options
        self.position = position if position and position.get("source") == "search" else None
        self._total: int | None = None

    def first_page(self) -> str:
        query = [("date", f"ge{_instant(self.options.since) if self.options.since else '1900-01-01T00:00:00Z'}")]
        if self.options.until:
            query.append(("date", f"lt{_instant(self.options.until)}"))
        if self.options.patients:
            query.append(("patient", ",".join(f"Patient/{p}" for p in self.options.patients)))
        query += [("_sort", "date"), ("_count", str(self.options.page_size))]
        return "DocumentReference?" + urlencode(query, safe=":/,")

    def total(self) -> int | None:
        return self._total

    def documents(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        page_url: str | None = self.position["page"] if self.position else None
        skip = int(self.position.get("index", 0)) if self.position else 0
        if page_url is None:
            page_url = self.first_page()
        while page_url:
            response = _get(self.client, self.limiter, page_url)
            if response.status_code >= 400:
                raise BackfillError(f"search answered HTTP {response.status_code}")
            bundle = response.json()
            if self._total is None and isinstance(bundle.get("total"), int):
                self._total = int(bundle["total"])
            here = str(response.request.url)
            entries = [e.get("resource") for e in bundle.get("entry") or []]
            for index, resource in enumerate(entries):
                if index < skip or not isinstance(resource, dict):
                    continue
                yield resource, {"source": "search", "page": here, "index": index + 1}
            skip = 0
            page_url = next(
                (link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None
            )


class ExportSource:
    name = "export"

    def __init__(self, client: EhrClient, limiter: RateLimiter, options: RunOptions, position: dict[str, Any] | None):
        self.client = client
        self.limiter = limiter
        self.options = options
        self.base = EhrBase(client.base_url)
        self.position = position if position and position.get("source") == "export" else None
        self.manifest: dict[str, Any] | None = self.position.get("manifest") if self.position else None
        self.status_url: str | None = self.position.get("status") if self.position else None

    def total(self) -> int | None:
        if not self.manifest:
            return None
        return sum(int(o.get("count") or 0) for o in self._outputs()) or None

    def _outputs(self) -> list[dict[str, Any]]:
        return [o for o in (self.manifest or {}).get("output") or [] if o.get("type") == "DocumentReference"]

    def _inside(self, url: str, what: str) -> str:
        if not self.base.contains(url):
            raise BackfillError(f"the export's {what} URL lies outside the configured EHR base URL; refused")
        return url

    def kick_off(self) -> None:
        path = f"Group/{self.options.group}/$export" if self.options.group else "$export"
        query = [("_type", "DocumentReference")]
        if self.options.since:
            query.append(("_since", _instant(self.options.since)))
        response = _get(
            self.client,
            self.limiter,
            f"{path}?{urlencode(query, safe=':')}",
            headers={"Prefer": "respond-async", "Accept": "application/fhir+json"},
            final=NO_EXPORT_STATUSES,
        )
        if response.status_code in NO_EXPORT_STATUSES:
            raise ExportUnsupportedError(f"$export answered HTTP {response.status_code}")
        location = response.headers.get("Content-Location")
        if response.status_code != 202 or not location:
            raise ExportUnsupportedError(f"$export answered HTTP {response.status_code} without a status URL")
        self.status_url = self._inside(location, "status")

    def wait_for_manifest(self, record: Callable[[dict[str, Any]], None]) -> None:
        assert self.status_url is not None
        while True:
            response = _get(self.client, self.limiter, self.status_url, headers={"Accept": "application/json"})
            if response.status_code == 202:
                delay = parse_retry_after(response.headers.get("Retry-After"))
                self.limiter.sleep(min(120.0, delay if delay is not None else 5.0))
                continue
            if response.status_code != 200:
                raise BackfillError(f"the export's status answered HTTP {response.status_code}")
            manifest = response.json()
            for output in manifest.get("output") or []:
                self._inside(str(output.get("url") or ""), "file")
            self.manifest = {"transactionTime": manifest.get("transactionTime"), "output": manifest.get("output") or []}
            record({"source": "export", "status": self.status_url, "manifest": self.manifest, "file": 0, "line": 0})
            return

    def documents(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        raise NotImplementedError("use lines()")

    def lines(self, record: Callable[[dict[str, Any]], None]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        if self.manifest is None:
            if self.status_url is None:
                self.kick_off()
            self.wait_for_manifest(record)
        start_file = int(self.position.get("file", 0)) if self.position and self.position.get("manifest") else 0
        start_line = int(self.position.get("line", 0)) if self.position and self.position.get("manifest") else 0
        outputs = self._outputs()
        for file_index in range(start_file, len(outputs)):
            url = self._inside(str(outputs[file_index].get("url") or ""), "file")
            skip = start_line if file_index == start_file else 0
            number = 0
            for line in self.client.stream_lines(url):
                if not line.strip():
                    continue
                number += 1
                if number <= skip:
                    continue
                resource = json.loads(line)
                position = {
                    "source": "export",
                    "status": self.status_url,
                    "manifest": self.manifest,
                    "file": file_index,
                    "line": number,
                }
                yield resource, position
            record(
                {
                    "source": "export",
                    "status": self.status_url,
                    "manifest": self.manifest,
                    "file": file_index + 1,
                    "line": 0,
                }
            )

    def finish(self) -> None:
        """Tell the EHR it may delete the export's files (Bulk Data: DELETE the status URL)."""
        if self.status_url:
            with contextlib.suppress(EhrError):
                self.client.respond("DELETE", self.status_url)


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Progress:
    started: float = field(default_factory=time.monotonic)
    shown: float = 0.0
    window: list[tuple[float, int]] = field(default_factory=list)

    def pace(self, scanned: int) -> float | None:
        now = time.monotonic()
        self.window.append((now, scanned))
        self.window = [(t, n) for t, n in self.window if now - t <= 20] or [(now, scanned)]
        first_t, first_n = self.window[0]
        return (scanned - first_n) / (now - first_t) if now - first_t >= 1 else None


def progress_line(record: dict[str, Any], dry_run: bool) -> str:
    total = record.get("total")
    scanned = int(record.get("scanned") or 0)
    width = 30
    if total:
        done = min(1.0, scanned / total)
        bar = "#" * int(done * width) + "." * (width - int(done * width))
        head = f"[{bar}] {scanned:,}/{total:,} {done:4.0%}"
    else:
        head = f"{scanned:,} notes"
    verb = "to queue" if dry_run else "queued"
    counts = (
        f"{verb} {record.get('queued', 0):,}, already processed {record.get('duplicates', 0):,}, "
        f"skipped {record.get('skipped', 0):,}"
    )
    if record.get("kind") == "reprocess":
        counts += f", up to date {record.get('up_to_date', 0):,}"
    pace = record.get("pace")
    eta = record.get("eta_seconds")
    tail = f" | {pace:.1f} notes/s" if pace else ""
    if eta is not None:
        minutes, seconds = divmod(int(eta), 60)
        tail += (
            f" | ETA {minutes // 60}h{minutes % 60:02d}m{seconds:02d}s"
            if minutes >= 60
            else f" | ETA {minutes}m{seconds:02d}s"
        )
    return f"{head} {counts}{tail}"


class Run:
    """One backfill or reprocessing run, driven to its end (or resumed from where it stopped)."""

    def __init__(
        self,
        options: RunOptions,
        client: EhrClient | None = None,
        show: Callable[[str, bool], None] | None = None,
    ) -> None:
        settings = get_settings()
        self.options = options
        self.name = options.run_name()
        self.state = BulkState(get_redis(), settings.key_prefix)
        self.intake = get_intake()
        self.client = client or EhrClient.from_settings(settings)
        self.client.retry = RetryPolicy(attempts=1)  # the run sees each 429 itself, to slow down
        self.client.breaker = None  # and backs off on its own: an EHR without $export (501) trips nothing
        self.limiter = RateLimiter(options.rate)
        self.owner = uuid.uuid4().hex
        self.show = show
        self.progress = Progress()
        self.scanned = 0
        self.last_record = 0.0

    # -------------------------------------------------------------- lock
    def _take_lock(self) -> None:
        deadline = time.monotonic() + LOCK_SECONDS + 2
        while not self.state.lock(self.name, self.owner, LOCK_SECONDS):
            if time.monotonic() > deadline:
                raise BackfillError(f"run {self.name} is being driven by another process")
            time.sleep(0.5)

    def _keep_lock(self) -> None:
        if not self.state.lock(self.name, self.owner, LOCK_SECONDS):
            raise BackfillError(f"run {self.name}: lost its lock to another process")

    # -------------------------------------------------------------- driving
    def execute(self) -> dict[str, Any]:
        self._take_lock()
        try:
            record = self.state.open_run(self.name, self.options.kind, self.options.params(), self.options.dry_run)
            self.scanned = int(record.get("scanned") or 0)
            position = record.get("position") if isinstance(record.get("position"), dict) else None
            self.state.update(
                self.name,
                state="running",
                rate=self.options.rate,
                effective_rate=self.options.rate,
                dry_run=int(self.options.dry_run),
            )
            try:
                source = self._walk(position)
            except BaseException as error:
                self.state.update(
                    self.name,
                    state="interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
                    error=f"{type(error).__name__}: {error}"[:500],
                )
                raise
            final = "dry-run" if self.options.dry_run else "done"
            self.state.update(self.name, state=final, finished=time.time(), source=source, position="")
            result = self.state.get(self.name)
            assert result is not None
            self._show(result, final=True)
            return result
        finally:
            self.state.unlock(self.name, self.owner)
            self.client.close()

    def _walk(self, position: dict[str, Any] | None) -> str:
        choice = self.options.source
        if choice == "auto" and self.options.patients and not self.options.group:
            choice = "search"  # a system export would bring every patient's notes to find a few
        if position and position.get("source") in ("export", "search"):
            choice = position["source"]
        if choice in ("auto", "export"):
            export = ExportSource(self.client, self.limiter, self.options, position)
            try:
                self.state.update(self.name, source="export")
                for document, where in export.lines(self._record_position):
                    self._accept(document, where, export.total())
                if not self.options.dry_run:
                    export.finish()
                return "export"
            except ExportUnsupportedError as reason:
                if choice == "export":
                    raise BackfillError(f"--source export: {reason}") from None
                logger.info("no Bulk Data export (%s): paging through search", reason)
                position = None
        search = SearchSource(self.client, self.limiter, self.options, position)
        self.state.update(self.name, source="search")
        for document, where in search.documents():
            self._accept(document, where, search.total())
        return "search"

    def _record_position(self, position: dict[str, Any]) -> None:
        self.state.update(self.name, position=position, scanned=self.scanned)

    def _accept(self, document: dict[str, Any], position: dict[str, Any], total: int | None) -> None:
        if document.get("resourceType") != "DocumentReference" or not self.options.wants(document):
            if time.monotonic() - self.last_record >= RECORD_EVERY_SECONDS:
                self._tick(total, position)
            return
        self.scanned += 1
        note = self._classify(document)
        if self.options.dry_run:
            self._count_dry(note, position)
        else:
            self._claim(note, position)
        if time.monotonic() - self.last_record >= RECORD_EVERY_SECONDS:
            self._tick(total, position)

    def _classify(self, document: dict[str, Any]) -> FoundNote:
        try:
            prepared = self.intake.prepare(document)
        except IntakeRejectedError as error:
            return FoundNote(str(document.get("id") or "?"), "?", "skip", None, str(error))
        if self.options.kind == "reprocess" and prepared.action != "process":
            return FoundNote(prepared.document_id, prepared.version_id, "skip", None, prepared.reason or "")
        return FoundNote(prepared.document_id, prepared.version_id, prepared.action, document, prepared.reason or "")

    def _claim(self, note: FoundNote, position: dict[str, Any]) -> None:
        queueable = note.action in ("process", "retract")
        if queueable:
            self.limiter.wait()
        task = TASK_RETRACT_NOTE if note.action == "retract" else TASK_PROCESS_NOTE
        envelope = celery_envelope(task, [note.document_id, note.version_id], BULK_PRIORITY) if queueable else None
        outcome = self.state.claim(
            self.name, self.options.kind, note, envelope, position, self.scanned, self.options.fingerprint
        )
        if outcome == "queued":
            if envelope is None:  # a broker other than the state Redis: send it after the claim
                from core.celery_app import get_celery_app

                get_celery_app().send_task(task, args=[note.document_id, note.version_id], priority=BULK_PRIORITY)
            self.limiter.charge()
        self._keep_lock_every(1.0)

    def _count_dry(self, note: FoundNote, position: dict[str, Any]) -> None:
        """What the run would do with this note, counted without claiming or queueing anything."""
        client = self.state.client
        prefix = get_settings().key_prefix
        status_key = f"{prefix}:status:{note.document_id}"
        if self.options.kind == "reprocess":
            raw = client.hget(status_key, note.version_id) if note.action == "process" else None
            record = json.loads(raw) if raw else None
            if record is None or record.get("status") != "done":
                field_name = "skipped"
            elif f"{record.get('model') or ''}|{record.get('profile') or ''}" == self.options.fingerprint:
                field_name = "up_to_date"
            else:
                field_name = "queued"
        else:
            claimed = client.exists(f"{prefix}:seen:{note.document_id}:{note.version_id}") or client.hexists(
                status_key, note.version_id
            )
            if claimed:
                field_name = "duplicates"
            elif note.action == "skip" or (note.action == "retract" and not client.hlen(status_key)):
                field_name = "skipped"
            else:
                field_name = "queued"
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(self.state.run_key(self.name), field_name, 1)
        pipe.hset(
            self.state.run_key(self.name),
            mapping={"scanned": self.scanned, "position": json.dumps(position, sort_keys=True)},
        )
        pipe.execute()
        self._keep_lock_every(1.0)

    def _keep_lock_every(self, seconds: float) -> None:
        now = time.monotonic()
        if now - getattr(self, "_locked_at", 0.0) >= seconds:
            self._keep_lock()
            self._locked_at = now

    def _tick(self, total: int | None, position: dict[str, Any]) -> None:
        self.last_record = time.monotonic()
        pace = self.progress.pace(self.scanned)
        self.state.update(
            self.name,
            total=total,
            pace=pace,
            effective_rate=round(self.limiter.rate, 3),
            throttled=self.limiter.throttles,
        )
        record = self.state.get(self.name)
        if record is not None:
            self._show(record)

    def _show(self, record: dict[str, Any], final: bool = False) -> None:
        if self.show is not None:
            self.show(progress_line(record, self.options.dry_run), final)


def terminal_progress(line: str, final: bool) -> None:
    """A progress bar redrawn in place on a terminal; a line every few seconds otherwise (logs)."""
    stream = sys.stderr
    if stream.isatty():
        stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        stream.flush()
        return
    now = time.monotonic()
    if final or now - getattr(terminal_progress, "_last", 0.0) >= 5:
        terminal_progress._last = now  # type: ignore[attr-defined]
        stream.write(line + "\n")
        stream.flush()


# ---------------------------------------------------------------------------------------------- reprocess
def configured_model_revision() -> str:
    """The revision the workers' tagger writes into the Provenance (its tagger_config.json), without loading it."""
    from worker.runtime import default_model_path

    settings = get_settings()
    folder = settings.model_path or default_model_path()
    if folder is None:
        raise BackfillError("no tagger checkpoint: set FHIR_NER_MODEL_PATH or give --older-than-model")
    config_file = Path(folder) / "tagger_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BackfillError(f"{config_file}: cannot read the model's revision ({error})") from None
    revision = config.get("model_revision") or f"untrained@{config.get('encoder_revision', '')}"
    return str(revision)


def profile_fingerprint() -> str:
    """A short hash of the mapping profile in force (what a note's resources were mapped with)."""
    from mappings.bundle import profile_fingerprint as fingerprint
    from worker.runtime import get_profile

    return fingerprint(get_profile())
