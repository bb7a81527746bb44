// A minimal SMART App Launch authorization server for the test EHR (EHR launch, authorization code + PKCE S256).
//
//   GET  /fhir/R4/.well-known/smart-configuration   the endpoints below (issuer: the FHIR base URL)
//   GET  /smart/authorize   checks client, redirect URI, aud, launch and PKCE challenge, then (no login page: a
//                           test) redirects straight back with a one-use code bound to all of them
//   POST /smart/token       checks the code, client (secret as HTTP Basic for a confidential client, client_id in
//                           the form for a public one), redirect URI and PKCE verifier; answers access_token,
//                           patient and an RS256 id_token (fhirUser, name) signed with a key made at start
//   GET  /smart/jwks        that key's public half
//
// Test control (outside the FHIR base):
//   POST /$admin/smart/clients {"client_id", "client_secret"?, "redirect_uris": [...]}   register a client
//   POST /$admin/smart/launch  {"patient", "user", "name", "tokenError"?, "claims"?} -> {"launch"}
//            user: "Practitioner/..." (made absolute under the FHIR base in the id_token's fhirUser);
//            tokenError: the token endpoint answers 400 with that OAuth error; claims: merged into the id_token
//   GET  /$admin/smart/log    {"authorize": [query...], "token": [{form, basic}...]}
import crypto from 'node:crypto';

const { privateKey, publicKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const KID = `test-${crypto.randomBytes(4).toString('hex')}`;
const JWK = { ...publicKey.export({ format: 'jwk' }), kid: KID, alg: 'RS256', use: 'sig' };

const b64url = (data) => Buffer.from(data).toString('base64url');

function signJwt(claims) {
  const input = `${b64url(JSON.stringify({ alg: 'RS256', typ: 'JWT', kid: KID }))}.${b64url(JSON.stringify(claims))}`;
  return `${input}.${crypto.sign('sha256', Buffer.from(input), privateKey).toString('base64url')}`;
}

function readText(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function json(res, status, body, headers = {}) {
  const payload = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store', ...headers });
  res.end(payload);
}

export function createSmart({ fhirPrefix }) {
  let clients = new Map();
  let launches = new Map();
  let codes = new Map();
  let log = { authorize: [], token: [] };

  function reset() {
    clients = new Map();
    launches = new Map();
    codes = new Map();
    log = { authorize: [], token: [] };
  }

  function configuration(origin) {
    return {
      issuer: `${origin}${fhirPrefix}`,
      authorization_endpoint: `${origin}/smart/authorize`,
      token_endpoint: `${origin}/smart/token`,
      jwks_uri: `${origin}/smart/jwks`,
      grant_types_supported: ['authorization_code'],
      token_endpoint_auth_methods_supported: ['client_secret_basic', 'none'],
      scopes_supported: ['openid', 'fhirUser', 'launch', 'patient/*.rs'],
      response_types_supported: ['code'],
      code_challenge_methods_supported: ['S256'],
      capabilities: ['launch-ehr', 'client-public', 'client-confidential-symmetric', 'sso-openid-connect',
        'context-ehr-patient', 'permission-v2'],
    };
  }

  function authorize(res, url, origin) {
    const q = Object.fromEntries(url.searchParams);
    log.authorize.push(q);
    const client = clients.get(q.client_id);
    if (!client || !client.redirect_uris.includes(q.redirect_uri)) {
      // Never redirect to an unregistered URI.
      return json(res, 400, { error: 'invalid_client' });
    }
    const back = (params) => {
      const target = new URL(q.redirect_uri);
      for (const [k, v] of Object.entries(params)) target.searchParams.set(k, v);
      res.writeHead(302, { Location: target.toString() });
      res.end();
    };
    const ctx = launches.get(q.launch);
    const scopes = (q.scope ?? '').split(' ');
    if (
      q.response_type !== 'code' || !ctx || q.aud !== `${origin}${fhirPrefix}` || !scopes.includes('launch') ||
      q.code_challenge_method !== 'S256' || !/^[A-Za-z0-9_-]{43}$/.test(q.code_challenge ?? '')
    ) {
      return back({ error: 'invalid_request', state: q.state ?? '' });
    }
    const code = crypto.randomBytes(24).toString('base64url');
    codes.set(code, { client_id: q.client_id, redirect_uri: q.redirect_uri, challenge: q.code_challenge, ctx, scope: q.scope });
    return back({ code, state: q.state ?? '' });
  }

  async function token(req, res, origin) {
    const form = Object.fromEntries(new URLSearchParams(await readText(req)));
    let basic = null;
    const header = req.headers.authorization ?? '';
    if (header.startsWith('Basic ')) {
      const [id, secret] = Buffer.from(header.slice(6), 'base64').toString('utf8').split(':');
      basic = { client_id: decodeURIComponent(id.replace(/\+/g, ' ')), secret: decodeURIComponent((secret ?? '').replace(/\+/g, ' ')) };
    }
    log.token.push({ form, basic: basic ? basic.client_id : null });
    const clientId = basic ? basic.client_id : form.client_id;
    const client = clients.get(clientId);
    if (!client || (client.client_secret ? !basic || basic.secret !== client.client_secret : Boolean(basic))) {
      return json(res, 401, { error: 'invalid_client' });
    }
    const grant = codes.get(form.code);
    codes.delete(form.code); // one use, whatever happens next
    if (form.grant_type !== 'authorization_code' || !grant || grant.client_id !== clientId || grant.redirect_uri !== form.redirect_uri) {
      return json(res, 400, { error: 'invalid_grant' });
    }
    const challenge = crypto.createHash('sha256').update(form.code_verifier ?? '').digest('base64url');
    if (challenge !== grant.challenge) {
      return json(res, 400, { error: 'invalid_grant', error_description: 'PKCE verifier does not match' });
    }
    if (grant.ctx.tokenError) {
      return json(res, 400, { error: grant.ctx.tokenError });
    }
    const base = `${origin}${fhirPrefix}`;
    const now = Math.floor(Date.now() / 1000);
    const idToken = signJwt({
      iss: base,
      sub: grant.ctx.user,
      aud: clientId,
      iat: now,
      exp: now + 300,
      fhirUser: `${base}/${grant.ctx.user}`,
      name: grant.ctx.name,
      ...(grant.ctx.claims ?? {}),
    });
    return json(res, 200, {
      access_token: crypto.randomBytes(24).toString('base64url'),
      token_type: 'Bearer',
      expires_in: 3600,
      scope: grant.scope,
      patient: grant.ctx.patient,
      id_token: idToken,
    });
  }

  async function admin(req, res, action) {
    if (req.method === 'POST' && action === '/clients') {
      const body = JSON.parse((await readText(req)) || '{}');
      clients.set(body.client_id, { client_secret: body.client_secret ?? null, redirect_uris: body.redirect_uris ?? [] });
      return json(res, 200, { ok: true });
    }
    if (req.method === 'POST' && action === '/launch') {
      const body = JSON.parse((await readText(req)) || '{}');
      const launch = crypto.randomBytes(12).toString('base64url');
      launches.set(launch, body);
      return json(res, 200, { launch });
    }
    if (req.method === 'GET' && action === '/log') {
      return json(res, 200, log);
    }
    return json(res, 404, { error: `unknown SMART admin endpoint ${req.method} ${action}` });
  }

  // True when the request was one of ours (answered), false otherwise.
  async function handle(req, res, url, origin, adminPrefix) {
    if (url.pathname.startsWith(`${adminPrefix}/smart/`)) {
      await admin(req, res, url.pathname.slice(`${adminPrefix}/smart`.length));
      return true;
    }
    if (req.method === 'GET' && url.pathname === `${fhirPrefix}/.well-known/smart-configuration`) {
      json(res, 200, configuration(origin));
      return true;
    }
    if (req.method === 'GET' && url.pathname === '/smart/authorize') {
      authorize(res, url, origin);
      return true;
    }
    if (req.method === 'POST' && url.pathname === '/smart/token') {
      await token(req, res, origin);
      return true;
    }
    if (req.method === 'GET' && url.pathname === '/smart/jwks') {
      json(res, 200, { keys: [JWK] });
      return true;
    }
    return false;
  }

  return { handle, reset };
}
