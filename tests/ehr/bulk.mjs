// Bulk parts of the test EHR (imported by server.mjs): a generated population of notes, FHIR Bulk Data
// `$export` (system and Group level) with status polling and NDJSON files, and an indexed DocumentReference
// search so that paging through ten thousand notes does not scan every resource with FHIRPath per page.
//
//   POST /$admin/population {"count": 10000, "texts": [{"text": "...", "language": "es"}], "patients": 40,
//                            "enteredInError": 0.02, "superseded": 0.03, "revised": 0.05, "seed": 7,
//                            "dateFrom": "2019-01-01T00:00:00Z", "dateTo": "2025-12-31T00:00:00Z"}
//        creates Patients, a Group of the first half of them, and `count` DocumentReferences (no subscription
//        events: they are notes written before the adapter was switched on). Some are entered-in-error, some
//        superseded (status superseded, replaced by a later note), some revised (a second version). Answers
//        {"patients": [...], "group": id, "documents": [{id, version, status, date, patient, language}]}.
//   POST /$admin/export {"supported": true, "polls": 2, "retryAfter": 1, "perFile": 1000, "fileBase": null}
//        supported false: $export answers 501 (an EHR without Bulk Data); polls: how many status requests
//        answer 202 (with Retry-After) before the manifest; fileBase: another base for the output URLs (to
//        test that the client refuses them).
//   GET  /$admin/export  {"config": {...}, "jobs": [{id, polls, files, resources, cancelled}]}
//
// FHIR side (under the base, counted in the request log like every FHIR request):
//   GET [base]/$export?_type=DocumentReference&_since=...        (Prefer: respond-async)  → 202 Content-Location
//   GET [base]/Group/{id}/$export?_type=DocumentReference&_since=...
//   GET [base]/$export-poll-status/{job}   → 202 (Retry-After, X-Progress) until ready, then 200 + manifest
//   DELETE [base]/$export-poll-status/{job} → 202 (job cancelled)
//   GET [base]/$export-file/{job}/{n}       → application/fhir+ndjson, streamed line by line

const BULK_EXPORT = 'http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export';

function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function comparable(value) {
  const time = Date.parse(value);
  return Number.isNaN(time) ? undefined : time;
}

function referenceId(value) {
  return String(value).split('/').pop();
}

export function createBulk({ repo, send, outcome, issue }) {
  let config = { supported: true, polls: 2, retryAfter: 1, perFile: 1000, fileBase: null };
  let jobs = new Map();

  function reset() {
    config = { supported: true, polls: 2, retryAfter: 1, perFile: 1000, fileBase: null };
    jobs = new Map();
  }

  function documents() {
    return [...(repo.resources.get('DocumentReference') ?? new Map()).values()];
  }

  // ------------------------------------------------------------------ indexed DocumentReference search
  // Handles DocumentReference searches on date, _lastUpdated and patient/subject (ge/gt/le/lt, comma = OR),
  // sorted by date (then id) or in insertion order, with _count/_offset; anything else is Medplum's own.
  function fastSearch(request) {
    if (request.resourceType !== 'DocumentReference') return undefined;
    if (request.include?.length || request.revInclude?.length) return undefined;
    const filters = request.filters ?? [];
    const supported = filters.every(
      (f) =>
        (['date', '_lastUpdated'].includes(f.code) && ['ge', 'gt', 'le', 'lt'].includes(f.operator)) ||
        (['patient', 'subject'].includes(f.code) && (f.operator === 'eq' || f.operator === undefined))
    );
    const sort = request.sortRules ?? [];
    if (!supported || sort.some((s) => s.code !== 'date' && s.code !== '_id') || filters.length === 0) return undefined;
    let found = documents();
    for (const f of filters) {
      if (f.code === 'patient' || f.code === 'subject') {
        const wanted = new Set(String(f.value).split(',').map(referenceId));
        found = found.filter((d) => d.subject?.reference && wanted.has(referenceId(d.subject.reference)));
        continue;
      }
      const bound = comparable(f.value);
      if (bound === undefined) return undefined;
      const field = f.code === 'date' ? (d) => d.date : (d) => d.meta?.lastUpdated;
      found = found.filter((d) => {
        const value = comparable(field(d));
        if (value === undefined) return false;
        return f.operator === 'ge' ? value >= bound : f.operator === 'gt' ? value > bound : f.operator === 'le' ? value <= bound : value < bound;
      });
    }
    if (sort.length) {
      const descending = sort[0].descending ? -1 : 1;
      found = [...found].sort(
        (a, b) => descending * ((comparable(a.date) ?? 0) - (comparable(b.date) ?? 0)) || a.id.localeCompare(b.id)
      );
    }
    const total = found.length;
    const offset = request.offset ?? 0;
    const count = request.count ?? 20;
    const entries = found.slice(offset, offset + count).map((resource) => ({ resource: JSON.parse(JSON.stringify(resource)) }));
    return { resourceType: 'Bundle', type: 'searchset', entry: entries.length ? entries : undefined, total };
  }

  // ------------------------------------------------------------------ population
  async function populate(body) {
    const count = Number.isInteger(body.count) ? body.count : 1000;
    const texts = Array.isArray(body.texts) && body.texts.length ? body.texts : [{ text: 'Nota clínica.', language: 'es' }];
    const random = mulberry32(Number.isInteger(body.seed) ? body.seed : 7);
    const from = comparable(body.dateFrom ?? '2019-01-01T00:00:00Z');
    const to = comparable(body.dateTo ?? '2025-12-31T00:00:00Z');
    const patients = [];
    for (let i = 0; i < (Number.isInteger(body.patients) ? body.patients : 40); i++) {
      const created = await repo.createResource({ resourceType: 'Patient', name: [{ family: `Poblacion${i}` }] });
      patients.push(created.id);
    }
    const group = await repo.createResource({
      resourceType: 'Group',
      type: 'person',
      actual: true,
      member: patients.slice(0, Math.ceil(patients.length / 2)).map((id) => ({ entity: { reference: `Patient/${id}` } })),
    });
    const listing = [];
    for (let i = 0; i < count; i++) {
      const sample = texts[i % texts.length];
      const date = new Date(from + ((to - from) * (i + random())) / count).toISOString().replace(/\.\d{3}Z$/, 'Z');
      const patient = patients[Math.floor(random() * patients.length)];
      const roll = random();
      const kind =
        roll < (body.enteredInError ?? 0.02)
          ? 'entered-in-error'
          : roll < (body.enteredInError ?? 0.02) + (body.superseded ?? 0.03)
            ? 'superseded'
            : roll < (body.enteredInError ?? 0.02) + (body.superseded ?? 0.03) + (body.revised ?? 0.05)
              ? 'revised'
              : 'current';
      const text = `${sample.text} (${i})`;
      const document = {
        resourceType: 'DocumentReference',
        status: kind === 'entered-in-error' ? 'entered-in-error' : kind === 'superseded' ? 'superseded' : 'current',
        docStatus: 'final',
        subject: { reference: `Patient/${patient}` },
        date,
        content: [
          {
            attachment: {
              contentType: 'text/plain; charset=utf-8',
              language: sample.language,
              data: Buffer.from(text, 'utf8').toString('base64'),
            },
          },
        ],
      };
      let created = await repo.createResource(document);
      if (kind === 'revised') {
        const revised = `${sample.text} Revisado (${i}).`;
        created = await repo.updateResource({
          ...created,
          docStatus: 'amended',
          content: [{ attachment: { ...document.content[0].attachment, data: Buffer.from(revised, 'utf8').toString('base64') } }],
        });
      }
      listing.push({
        id: created.id,
        version: created.meta.versionId,
        status: created.status,
        kind,
        date,
        patient,
        language: sample.language,
      });
    }
    return { patients, group: group.id, documents: listing };
  }

  // ------------------------------------------------------------------ $export
  function capability(statement) {
    if (!config.supported) return statement;
    statement.rest[0].operation = [{ name: 'export', definition: BULK_EXPORT }];
    return statement;
  }

  function kickOff(req, url, baseUrl, groupId, relative) {
    if (!config.supported) {
      return [501, outcome([issue('not-supported', '$export is not supported by this server')])];
    }
    if (!/respond-async/.test(req.headers.prefer ?? '')) {
      return [400, outcome([issue('invalid', 'Bulk export requires Prefer: respond-async')])];
    }
    const types = (url.searchParams.get('_type') ?? 'DocumentReference').split(',').map((t) => t.trim());
    const since = url.searchParams.get('_since');
    const sinceTime = since ? comparable(since) : undefined;
    if (since && sinceTime === undefined) return [400, outcome([issue('invalid', `Invalid _since: ${since}`)])];
    let members;
    if (groupId !== undefined) {
      const group = repo.resources.get('Group')?.get(groupId);
      if (!group) return [404, outcome([issue('not-found', `Group/${groupId} not found`)])];
      members = new Set((group.member ?? []).map((m) => referenceId(m.entity?.reference ?? '')));
    }
    const resources = [];
    for (const type of types) {
      for (const resource of repo.resources.get(type)?.values() ?? []) {
        if (sinceTime !== undefined && (comparable(resource.meta?.lastUpdated) ?? 0) < sinceTime) continue;
        if (members && !members.has(referenceId(resource.subject?.reference ?? ''))) continue;
        resources.push({ type, line: JSON.stringify(resource) });
      }
    }
    const id = crypto.randomUUID();
    const files = [];
    for (let start = 0; start < resources.length; start += config.perFile) {
      const part = resources.slice(start, start + config.perFile);
      files.push({ type: part[0].type, lines: part.map((r) => r.line) });
    }
    jobs.set(id, {
      id,
      request: `${baseUrl}${relative}${url.search}`,
      transactionTime: new Date().toISOString(),
      pollsLeft: config.polls,
      polls: 0,
      files,
      resources: resources.length,
      cancelled: false,
    });
    return [202, outcome([issue('informational', 'Accepted')]), { 'Content-Location': `${baseUrl}/$export-poll-status/${id}` }];
  }

  function poll(req, id, baseUrl) {
    const job = jobs.get(id);
    if (!job || job.cancelled) return [404, outcome([issue('not-found', `No export job ${id}`)])];
    if (req.method === 'DELETE') {
      job.cancelled = true;
      return [202, outcome([issue('informational', 'Cancelled')])];
    }
    job.polls += 1;
    if (job.pollsLeft > 0) {
      job.pollsLeft -= 1;
      return [202, undefined, { 'Retry-After': String(config.retryAfter), 'X-Progress': 'in progress' }];
    }
    const fileBase = config.fileBase ?? baseUrl;
    return [
      200,
      {
        transactionTime: job.transactionTime,
        request: job.request,
        requiresAccessToken: true,
        output: job.files.map((file, n) => ({ type: file.type, url: `${fileBase}/$export-file/${id}/${n}`, count: file.lines.length })),
        error: [],
      },
    ];
  }

  async function file(res, id, n) {
    const job = jobs.get(id);
    const part = job && !job.cancelled ? job.files[Number.parseInt(n, 10)] : undefined;
    if (!part) {
      send(res, 404, outcome([issue('not-found', `No export file ${id}/${n}`)]));
      return 404;
    }
    res.writeHead(200, { 'Content-Type': 'application/fhir+ndjson' });
    // Streamed in chunks, as a large export file would be.
    for (let start = 0; start < part.lines.length; start += 100) {
      const chunk = part.lines.slice(start, start + 100).join('\n') + '\n';
      if (!res.write(chunk)) await new Promise((resolve) => res.once('drain', resolve));
    }
    res.end();
    return 200;
  }

  /** Answers a bulk request (returns its HTTP status), or undefined when the request is not one. */
  async function handle(req, res, url, baseUrl, prefix) {
    const segments = url.pathname.slice(prefix.length).split('/').filter(Boolean);
    let result;
    if (req.method === 'GET' && segments.length === 1 && segments[0] === '$export') {
      result = kickOff(req, url, baseUrl, undefined, url.pathname.slice(prefix.length));
    } else if (req.method === 'GET' && segments.length === 3 && segments[0] === 'Group' && segments[2] === '$export') {
      result = kickOff(req, url, baseUrl, segments[1], url.pathname.slice(prefix.length));
    } else if (segments.length === 2 && segments[0] === '$export-poll-status' && ['GET', 'DELETE'].includes(req.method)) {
      result = poll(req, segments[1], baseUrl);
    } else if (req.method === 'GET' && segments.length === 3 && segments[0] === '$export-file') {
      return file(res, segments[1], segments[2]);
    } else {
      return undefined;
    }
    const [status, body, headers] = result;
    if (body === undefined) {
      res.writeHead(status, headers ?? {});
      res.end();
    } else {
      send(res, status, body, headers ?? {});
    }
    return status;
  }

  async function admin(req, res, action, body) {
    if (req.method === 'POST' && action === '/population') {
      send(res, 200, await populate(body ?? {}));
      return true;
    }
    if (req.method === 'POST' && action === '/export') {
      const cfg = body ?? {};
      if (typeof cfg.supported === 'boolean') config.supported = cfg.supported;
      if (Number.isInteger(cfg.polls)) config.polls = cfg.polls;
      if (Number.isFinite(cfg.retryAfter)) config.retryAfter = cfg.retryAfter;
      if (Number.isInteger(cfg.perFile) && cfg.perFile > 0) config.perFile = cfg.perFile;
      if ('fileBase' in cfg) config.fileBase = cfg.fileBase;
      send(res, 200, { ok: true, config });
      return true;
    }
    if (req.method === 'GET' && action === '/export') {
      const listing = [...jobs.values()].map((j) => ({ id: j.id, polls: j.polls, files: j.files.length, resources: j.resources, cancelled: j.cancelled }));
      send(res, 200, { config, jobs: listing });
      return true;
    }
    return undefined;
  }

  return { reset, fastSearch, capability, handle, admin };
}
