// Test servers for the network tests, on the host: the "real internet" the guest may reach.
// Usage: node server.js DIR   (DIR holds server.key/server.crt; ports go to DIR/ready.json)
// Every request and every raw byte received is recorded in DIR/canary.jsonl, so tests can
// prove what did and did not arrive.
'use strict';
const fs = require('fs'), http = require('http'), https = require('https'), http2 = require('http2');
const net = require('net'), dgram = require('dgram'), crypto = require('crypto'), path = require('path');
const dir = process.argv[2];
const tls = { key: fs.readFileSync(path.join(dir, 'server.key')), cert: fs.readFileSync(path.join(dir, 'server.crt')) };
const log = (rec) => fs.appendFileSync(path.join(dir, 'canary.jsonl'), JSON.stringify(rec) + '\n');
const sha = (s) => crypto.createHash('sha256').update(s || '').digest('hex');

function handler(kind) {
  return (req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString('latin1');
      const sock = req.socket || {};
      log({ server: kind, sni: sock.servername || null, version: req.httpVersion, method: req.method,
            path: req.url, headers: req.headers, body });
      if (req.url.startsWith('/reset')) { res.write('partial'); setTimeout(() => sock.destroy(), 50); return; }
      if (req.url.startsWith('/git/')) {
        // A dumb-HTTP git repository that wants the real token.
        if (req.headers['authorization'] !== 'Bearer ' + process.env.REAL_TOKEN) { res.writeHead(401); res.end(); return; }
        const p = path.join(dir, 'git', path.normalize(req.url.slice(5).split('?')[0]));
        fs.readFile(p, (err, data) => { if (err) { res.writeHead(404); res.end(); } else { res.end(data); } });
        return;
      }
      // Never echo header values: the guest must not learn a secret from a response.
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ version: req.httpVersion, method: req.method, host: req.headers['host'] || req.headers[':authority'],
        auth_sha256: sha(req.headers['authorization']), path_sha256: sha(req.url), body_sha256: sha(body) }) + '\n');
    });
  };
}

function wsAccept(req, socket) {
  // Minimal RFC 6455 echo (text frames, masked from the client, unmasked back).
  log({ server: 'ws', sni: socket.servername || null, method: req.method, path: req.url, headers: req.headers, body: '' });
  const accept = crypto.createHash('sha1').update(req.headers['sec-websocket-key'] + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
  socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ' + accept + '\r\n\r\n');
  let buf = Buffer.alloc(0);
  socket.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    while (buf.length >= 2) {
      const op = buf[0] & 0x0f; let len = buf[1] & 0x7f; let off = 2;
      if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); off = 4; }
      else if (len === 127) { socket.destroy(); return; }
      if (buf.length < off + 4 + len) return;
      const mask = buf.slice(off, off + 4); const data = Buffer.from(buf.slice(off + 4, off + 4 + len));
      for (let i = 0; i < data.length; i++) data[i] ^= mask[i % 4];
      buf = buf.slice(off + 4 + len);
      if (op === 8) { socket.end(Buffer.from([0x88, 0])); return; }
      if (op === 1) {
        log({ server: 'ws-frame', body: data.toString('latin1') });
        const out = Buffer.from('echo:' + data.toString());
        const hdr = out.length < 126 ? Buffer.from([0x81, out.length]) : Buffer.from([0x81, 126, out.length >> 8, out.length & 0xff]);
        socket.write(Buffer.concat([hdr, out]));
      }
    }
  });
}

const ports = {};
const listen = (name, srv, host) => new Promise((ok) => srv.listen(0, host || '127.0.0.1', () => { ports[name] = srv.address().port; ok(); }));

(async () => {
  await listen('https', http2.createSecureServer({ ...tls, allowHTTP1: true }, handler('https')));
  const wss = https.createServer(tls, handler('wss'));
  wss.on('upgrade', wsAccept);
  await listen('wss', wss);
  await listen('http', http.createServer(handler('http')));
  // Raw TCP: echo, and a canary on all addresses recording every byte.
  await listen('echo', net.createServer((s) => s.pipe(s)));
  await listen('raw', net.createServer((s) => s.on('data', (d) => log({ server: 'raw', body: d.toString('latin1') }))), '0.0.0.0');
  const udp = dgram.createSocket('udp4');
  udp.on('message', (m) => log({ server: 'udp', body: m.toString('latin1') }));
  await new Promise((ok) => udp.bind(0, '0.0.0.0', ok));
  ports.udp = udp.address().port;
  fs.writeFileSync(path.join(dir, 'ready.json.tmp'), JSON.stringify(ports));
  fs.renameSync(path.join(dir, 'ready.json.tmp'), path.join(dir, 'ready.json'));
})();
