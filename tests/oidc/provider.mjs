// A real OpenID Connect provider (the `oidc-provider` package) for evstor's federation
// tests, on loopback. Usage: node provider.mjs [--port N] (0 or absent: any free port).
//
// - Signing keys are generated at every start (an RSA 2048 and an EC P-256 key, fresh key
//   ids), so restarting on the same port is an IdP key rotation.
// - Static clients use the client_credentials grant (client_secret_post, secret
//   `secret-<client id>`). The access token is a JWT whose audience, signing algorithm and
//   lifetime the resource indicator chooses: `urn:evstor-test:aud=<aud>;alg=<alg>;ttl=<s>`.
// - Some clients get extra claims (groups, department), as a user directory would add.
// - A forward proxy (CONNECT and absolute-form GET) runs on a second port and counts what
//   it relays; `/test/stats` counts discovery and JWKS requests.
//
// When ready it prints one JSON line: {"issuer": …, "proxy": …}.

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import * as net from 'node:net';
import Provider from 'oidc-provider';

const args = process.argv.slice(2);
const portArg = args.indexOf('--port');
const wantedPort = portArg >= 0 ? Number(args[portArg + 1]) : 0;

const CLIENTS = ['ci-robot', 'alice', 'other-app'];
const EXTRA = {
  alice: { groups: ['ops', 'everyone'], department: 'storage' },
  'ci-robot': { groups: ['robots'] },
};

function signingKey(type, options, alg) {
  const { privateKey } = crypto.generateKeyPairSync(type, options);
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: `${alg}-${crypto.randomBytes(6).toString('hex')}`, use: 'sig', alg };
}

function parseResource(resource) {
  const prefix = 'urn:evstor-test:';
  if (!resource.startsWith(prefix)) return undefined;
  const opts = Object.fromEntries(
    resource.slice(prefix.length).split(';').filter(Boolean).map((kv) => kv.split('=')),
  );
  return { aud: opts.aud ?? 'evstor', alg: opts.alg ?? 'RS256', ttl: Number(opts.ttl ?? 300) };
}

const stats = { discovery: 0, jwks: 0, token: 0, proxied: 0 };

const server = http.createServer();
server.listen(wantedPort, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    jwks: {
      keys: [
        signingKey('rsa', { modulusLength: 2048 }, 'RS256'),
        signingKey('ec', { namedCurve: 'P-256' }, 'ES256'),
      ],
    },
    clients: CLIENTS.map((id) => ({
      client_id: id,
      client_secret: `secret-${id}`,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_post',
    })),
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        getResourceServerInfo(ctx, resource) {
          const r = parseResource(resource);
          if (!r) throw new Provider.errors.InvalidTarget();
          return {
            scope: 'api',
            audience: r.aud,
            accessTokenTTL: r.ttl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: r.alg } },
          };
        },
      },
    },
    extraTokenClaims(ctx, token) {
      return EXTRA[token.clientId];
    },
  });
  provider.use(async (ctx, next) => {
    if (ctx.path === '/.well-known/openid-configuration') stats.discovery += 1;
    if (ctx.path === '/jwks') stats.jwks += 1;
    if (ctx.path === '/token') stats.token += 1;
    if (ctx.path === '/test/stats') {
      ctx.body = stats;
      return;
    }
    await next();
  });
  server.on('request', provider.callback());
  startProxy((proxyPort) => {
    process.stdout.write(`${JSON.stringify({ issuer, proxy: `http://127.0.0.1:${proxyPort}` })}\n`);
  });
});

// A minimal forward proxy: CONNECT tunnels and absolute-form plain http requests.
function startProxy(ready) {
  const proxy = http.createServer((req, res) => {
    stats.proxied += 1;
    let target;
    try {
      target = new URL(req.url);
    } catch {
      res.writeHead(400).end('absolute-form requests only');
      return;
    }
    const upstream = http.request(
      { host: target.hostname, port: target.port, path: target.pathname + target.search, method: req.method, headers: req.headers },
      (up) => {
        res.writeHead(up.statusCode, up.headers);
        up.pipe(res);
      },
    );
    upstream.on('error', () => res.writeHead(502).end());
    req.pipe(upstream);
  });
  proxy.on('connect', (req, socket, head) => {
    stats.proxied += 1;
    const [host, port] = req.url.split(':');
    const upstream = net.connect(Number(port), host, () => {
      socket.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      upstream.write(head);
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    upstream.on('error', () => socket.end('HTTP/1.1 502 Bad Gateway\r\n\r\n'));
  });
  proxy.listen(0, '127.0.0.1', () => ready(proxy.address().port));
}

// The test harness kills us; also end when its pipe closes.
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
