// A development OpenID Connect provider: the certified `oidc-provider`, configured so that its
// access tokens are JWTs a Ledger service accepts. `cargo xtask up --oidc` runs it beside the
// services and the tests run it on loopback; it is never a production identity provider.
//
// Configuration, all optional: LEDGER_OIDC_CONFIG (JSON, see DEFAULTS), PORT (0: any free port),
// HOST (127.0.0.1). Once listening it prints one JSON line, {"issuer": "http://..."}.
//
// Besides the provider's own routes it serves, for the tests, under /admin/:
//   GET  /admin/keys   the signing keys, with their private halves as PEM
//   POST /admin/keys   {"add": ["RS256", ...], "remove": ["<kid>", ...]}: rotates the keys; new
//                      keys come first, so the provider signs with them from then on
//   GET  /admin/stats  {"jwks_requests": n, "authorizations": [...]}: how often the JWKS was
//                      fetched, and what each authorization request asked for (client,
//                      response type, PKCE method), the last 100
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import http from 'node:http';
import Provider from 'oidc-provider';

const DEFAULTS = {
  audience: 'ledger',
  // The resource indicator the tokens are issued for (an absolute URI, as RFC 8707 wants).
  resource: 'urn:ledger:api',
  algs: ['RS256'],
  ttl_seconds: 600,
  clients: [
    {
      client_id: 'ledger-dev',
      client_secret: 'ledger-dev-secret',
      tenant: 'dev',
      roles: ['teller', 'viewer', 'auditor', 'admin'],
    },
    {
      // Swagger UI's sign-in: a public client, authorization code with PKCE.
      client_id: 'ledger-swagger',
      public: true,
      tenant: 'dev',
      roles: ['teller', 'viewer', 'auditor', 'admin'],
      redirect_uris: [
        'http://127.0.0.1:8080/docs/oauth2-redirect.html',
        'http://127.0.0.1:8081/docs/oauth2-redirect.html',
        'http://localhost:8080/docs/oauth2-redirect.html',
        'http://localhost:8081/docs/oauth2-redirect.html',
      ],
    },
  ],
};

// The scopes the API (the resource) offers, all of them granted at sign-in.
const RESOURCE_SCOPES = 'openid teller viewer auditor admin';

const config = { ...DEFAULTS, ...JSON.parse(process.env.LEDGER_OIDC_CONFIG ?? '{}') };
const host = process.env.HOST ?? '127.0.0.1';
const port = Number(process.env.PORT ?? 0);

function generateKey(alg) {
  const [type, options] = {
    RS256: ['rsa', { modulusLength: 2048 }],
    PS256: ['rsa', { modulusLength: 2048 }],
    ES256: ['ec', { namedCurve: 'P-256' }],
    EdDSA: ['ed25519', {}],
  }[alg] ?? (() => { throw new Error(`unsupported algorithm ${alg}`); })();
  const { privateKey, publicKey } = generateKeyPairSync(type, options);
  const kid = `${alg.toLowerCase()}-${randomUUID().slice(0, 8)}`;
  return {
    kid,
    alg,
    jwk: { ...privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig' },
    private_pem: privateKey.export({ format: 'pem', type: type === 'rsa' ? 'pkcs1' : 'pkcs8' }),
    public_pem: publicKey.export({ format: 'pem', type: 'spki' }),
  };
}

let keys = config.algs.map(generateKey);
let jwksRequests = 0;
const authorizations = [];

const clients = config.clients.map((client) => ({
  client_id: client.client_id,
  ...(client.public
    ? {
        token_endpoint_auth_method: 'none',
        grant_types: ['authorization_code'],
        response_types: ['code'],
        redirect_uris: client.redirect_uris,
      }
    : {
        client_secret: client.client_secret,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
      }),
  ledger_claims: {
    ...(client.tenant === undefined ? {} : { tenant: client.tenant }),
    ...(client.roles === undefined ? {} : { roles: client.roles }),
    ...(client.claims ?? {}),
  },
  ledger_alg: client.alg ?? config.algs[0],
}));

function buildProvider(issuer) {
  const provider = new Provider(issuer, {
    clients,
    jwks: { keys: keys.map((key) => key.jwk) },
    extraClientMetadata: { properties: ['ledger_claims', 'ledger_alg'] },
    features: {
      clientCredentials: { enabled: true },
      devInteractions: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => config.resource,
        useGrantedResource: () => true,
        getResourceServerInfo: (_ctx, _resource, client) => ({
          scope: RESOURCE_SCOPES,
          audience: config.audience,
          accessTokenTTL: config.ttl_seconds,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: client.ledger_alg } },
        }),
      },
    },
    extraTokenClaims: (ctx, token) => {
      const client = ctx.oidc.client ?? ctx.oidc.entities.Client;
      return client?.ledger_claims ?? {};
    },
    loadExistingGrant: async (ctx) => {
      // Development sign-in: every scope the client asks for is granted without a consent page.
      // Every one the API offers, `openid` included (Swagger UI asks for it): a grant short of
      // one would send the person to a consent page whose answer this grant then replaces.
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope('openid');
      grant.addResourceScope(config.resource, RESOURCE_SCOPES);
      await grant.save();
      return grant;
    },
    pkce: { required: () => true },
    clientBasedCORS: () => true,
  });
  provider.proxy = false;
  return provider;
}

function json(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

function publicKeys() {
  return keys.map(({ kid, alg, private_pem, public_pem }) => ({ kid, alg, private_pem, public_pem }));
}

async function admin(req, res, issuer, setProvider) {
  if (req.method === 'GET' && req.url === '/admin/keys') return json(res, 200, publicKeys());
  if (req.method === 'GET' && req.url === '/admin/stats') {
    return json(res, 200, { jwks_requests: jwksRequests, authorizations });
  }
  if (req.method === 'POST' && req.url === '/admin/keys') {
    let body = '';
    for await (const chunk of req) body += chunk;
    const { add = [], remove = [] } = JSON.parse(body || '{}');
    keys = [...add.map(generateKey), ...keys.filter((key) => !remove.includes(key.kid))];
    setProvider(buildProvider(issuer));
    return json(res, 200, publicKeys());
  }
  return json(res, 404, { error: 'not_found' });
}

const server = http.createServer();
server.listen(port, host, () => {
  const issuer = `http://${host}:${server.address().port}`;
  let callback = buildProvider(issuer).callback();
  server.on('request', (req, res) => {
    if (req.url.startsWith('/admin/')) {
      admin(req, res, issuer, (provider) => { callback = provider.callback(); }).catch((err) => {
        json(res, 500, { error: String(err) });
      });
      return;
    }
    const url = new URL(req.url, issuer);
    if (url.pathname === '/jwks') jwksRequests += 1;
    if (url.pathname === '/auth') {
      const asked = (name) => url.searchParams.get(name);
      authorizations.push({
        client_id: asked('client_id'),
        response_type: asked('response_type'),
        code_challenge_method: asked('code_challenge_method'),
        has_code_challenge: asked('code_challenge') !== null,
      });
      authorizations.splice(0, authorizations.length - 100);
    }
    callback(req, res);
  });
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});
