'use strict';
// Load client for greenchan's side-by-side benchmarks.
//
// One process, one mode, parameters as --key=value. It prints "START" on stdout
// when its measured window begins (so the runner can sample the server's CPU time),
// then one JSON line with the results, and exits. Every mode is bounded in time.
//
//   node client.js --mode=ws-echo   --url=ws://127.0.0.1:P/echo --conns=64 --size=32 --duration=3 [--binary]
//   node client.js --mode=tcp-echo  --port=P --conns=64 --size=32 --duration=3
//   node client.js --mode=ws-idle   --url=... --warm=100 --conns=5000 --hold=30
//   node client.js --mode=http-idle --port=P --path=/idle --warm=100 --conns=5000 --hold=30 [--accept=A --first]
//   node client.js --mode=ws-fanout --url=ws://127.0.0.1:P --subs=1000 --rounds=30 --duration=10
//   node client.js --mode=http      --port=P --path=/poll --conns=64 --duration=3
//
// The WebSocket client offers no compression (perMessageDeflate: false), so every
// server sends plain frames.

const net = require('net');
const http = require('http');
const WebSocket = require('ws');

const args = {};
for (const a of process.argv.slice(2)) {
  const m = /^--([^=]+)(?:=(.*))?$/.exec(a);
  if (m) args[m[1]] = m[2] === undefined ? true : m[2];
}
const num = (k, d) => (args[k] === undefined ? d : Number(args[k]));

const WARMUP = num('warmup', 1.0) * 1000;
const DURATION = num('duration', 3.0) * 1000;
const TIMEOUT = num('timeout', 60) * 1000;   // hard cap on the whole run

const hardStop = setTimeout(() => {
  emit({ error: `client timed out after ${TIMEOUT / 1000}s` });
  process.exit(2);
}, TIMEOUT);
hardStop.unref();

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function now() {
  return Number(process.hrtime.bigint()) / 1e6;   // milliseconds
}

function cpuMs(start) {
  const u = process.cpuUsage(start);
  return (u.user + u.system) / 1000;
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const i = Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length));
  return sorted[i];
}

// Round-trip samples: a growable Float64Array so a million samples cost 8 MB, not a
// million boxed numbers.
class Samples {
  constructor() { this.a = new Float64Array(1 << 16); this.n = 0; }
  push(v) {
    if (this.n === this.a.length) {
      const b = new Float64Array(this.a.length * 2); b.set(this.a); this.a = b;
    }
    this.a[this.n++] = v;
  }
  sorted() { return this.a.slice(0, this.n).sort(); }
}

// Measured window shared by the closed-loop modes: warm up, print START, count.
class Window {
  constructor() { this.measuring = false; this.count = 0; this.bytes = 0; this.rtt = new Samples(); }
  begin() {
    this.measuring = true;
    this.t0 = now();
    this.cpu0 = process.cpuUsage();
    process.stdout.write('START\n');
  }
  record(rttMs, bytes) {
    if (!this.measuring) return;
    this.count++; this.bytes += bytes; this.rtt.push(rttMs);
  }
  end(extra) {
    const elapsed = (now() - this.t0) / 1000;
    const cpu = cpuMs(this.cpu0) / 1000;
    const s = this.rtt.sorted();
    emit(Object.assign({
      messages: this.count,
      elapsed_s: elapsed,
      rate: this.count / elapsed,
      mb_per_s: this.bytes / elapsed / 1e6,
      p50_ms: percentile(s, 50),
      p99_ms: percentile(s, 99),
      client_cpu_s: cpu,
      client_cpu_pct: (100 * cpu) / elapsed,
    }, extra || {}));
  }
}

function runWindow(win, onDone) {
  setTimeout(() => {
    win.begin();
    setTimeout(() => { win.measuring = false; onDone(); }, DURATION);
  }, WARMUP);
}

// Open `n` WebSockets with at most `batch` handshakes in flight.
function openMany(url, n, batch, onEach, done, extra) {
  const socks = [];
  let started = 0, opened = 0, failed = 0;
  const next = () => {
    if (started >= n) return;
    started++;
    const ws = new WebSocket(url, Object.assign({ perMessageDeflate: false }, extra || {}));
    ws.binaryType = 'nodebuffer';
    ws.on('open', () => {
      socks.push(ws);
      if (onEach) onEach(ws);
      opened++;
      if (opened + failed === n) done(socks, failed); else next();
    });
    ws.on('error', (e) => {
      if (ws.readyState !== WebSocket.OPEN && !ws._counted) {
        ws._counted = true;
        failed++;
        if (opened + failed === n) done(socks, failed); else next();
      }
    });
  };
  for (let i = 0; i < Math.min(batch, n); i++) next();
}

function wsEcho() {
  const conns = num('conns', 64);
  const size = num('size', 32);
  const binary = !!args.binary;
  const payload = binary ? Buffer.alloc(size, 0x61) : 'a'.repeat(size);
  const win = new Window();
  let stop = false, errors = 0, closedEarly = 0;
  // --zero-mask: an all-zero masking key, which ws recognises and does not apply, so
  // that a 256 KiB echo measures the server and not the client's XOR loop. Servers
  // still run their unmasking code (XOR with zero costs them the same).
  const wsOpts = args['zero-mask'] ? { generateMask: (m) => m.fill(0) } : {};
  openMany(args.url, conns, 256, null, (socks, failed) => {
    if (failed) { emit({ error: `${failed} of ${conns} connections failed` }); process.exit(1); }
    for (const ws of socks) {
      let t = 0;
      ws.on('message', (data) => {
        const len = data.length;
        win.record(now() - t, len);
        if (stop) return;
        t = now();
        ws.send(payload, { binary });
      });
      ws.on('close', () => { if (!stop) closedEarly++; });
      ws.on('error', () => { errors++; });
      t = now();
      ws.send(payload, { binary });
    }
    runWindow(win, () => {
      stop = true;
      win.end({ conns, size, errors, closed_early: closedEarly });
      for (const ws of socks) ws.terminate();
      process.exit(0);
    });
  }, wsOpts);
}

// WebSocket echo on the raw client (the default for run.py): same loop as ws-echo.
function wsEchoRaw() {
  const conns = num('conns', 64);
  const size = num('size', 32);
  const binary = !!args.binary;
  const frame = maskedFrame(binary ? 0x2 : 0x1, Buffer.alloc(size, 0x61));
  const win = new Window();
  let stop = false;
  const onFrame = (op, head, sock) => {
    win.record(now() - sock._t, size);
    if (stop) return;
    sock._t = now();
    sock.write(frame);
  };
  openManyRaw(args.url, conns, 256, onFrame, (socks, failed) => {
    if (failed) { emit({ error: `${failed} of ${conns} connections failed` }); process.exit(1); }
    for (const sock of socks) { sock._t = now(); sock.write(frame); }
    runWindow(win, () => {
      stop = true;
      win.end({ conns, size, client: 'raw' });
      for (const sock of socks) sock.destroy();
      process.exit(0);
    });
  });
}

// Open-loop echo: `conns` connections, a fixed offered `rate` (messages/s in all). A
// 1 ms timer sends whatever is due by the clock, whatever the replies, round-robin
// over the connections; each 32-byte text message carries its sequence number, and a
// reply is matched to its send time by that number. START and STOP bound the window
// (the runner samples the server's CPU at both); replies to messages sent in the
// window are waited for up to --drain seconds after STOP, and one that never comes
// counts as late (infinitely slow for the percentiles).
function wsEchoOpen() {
  const conns = num('conns', 512);
  const size = Math.max(num('size', 32), 12);
  const rate = num('rate', 5000);
  const drainMs = num('drain', 2) * 1000;
  const cap = Math.ceil(rate * (WARMUP + DURATION + 1000) / 1000) + 1024;
  const sentAt = new Float64Array(cap);   // send time by sequence number; 0: not sent
  let seq = 0, phase = 0;   // 0 warm-up, 1 measuring, 2 draining
  let winFirst = 0, winLast = 0, repliesInWin = 0, late = 0, got = 0, unknown = 0;
  const rtt = new Samples();
  let t0 = 0, tStart = 0, tStop = 0, cpu0 = null, cpuStop = 0, timer = null, socks = null;
  const template = Buffer.alloc(size, 0x61);
  const onFrame = (op, head) => {
    let r = 0, i = 0;
    for (; i < head.length && head[i] >= 48 && head[i] <= 57; i++) r = r * 10 + head[i] - 48;
    if (i === 0 || r >= seq || sentAt[r] === 0) { unknown++; return; }
    const t = now();
    if (phase === 1) repliesInWin++;
    if (r >= winFirst && (phase === 0 ? false : r < (phase === 1 ? seq : winLast))) {
      rtt.push(t - sentAt[r]); got++;
    }
    sentAt[r] = 0;
  };
  const sendDue = () => {
    const due = Math.min(cap, Math.floor((now() - t0) * rate / 1000));
    while (seq < due) {
      const payload = Buffer.from(template);
      payload.write(String(seq), 0, 'latin1');
      payload[String(seq).length] = 0x3a;   // ':' ends the number
      sentAt[seq] = now();
      socks[seq % socks.length].write(maskedFrame(0x1, payload));
      seq++;
    }
  };
  const finish = () => {
    const s = rtt.sorted();
    const expected = winLast - winFirst;
    late = expected - got;
    const pct = (p) => {   // a late reply is slower than any that came
      const i = Math.floor((p / 100) * expected);
      return i >= s.length ? null : s[Math.min(i, s.length - 1)];
    };
    const elapsed = (tStop - tStart) / 1000;
    const cpu = cpuStop;
    emit({
      conns, size, offered_rate: rate, sent: expected, messages: repliesInWin, elapsed_s: elapsed,
      rate: repliesInWin / elapsed, late, unknown,
      saturated: late > expected * 0.001 || repliesInWin < 0.97 * expected,
      p50_ms: pct(50), p99_ms: pct(99), p999_ms: pct(99.9), max_ms: late ? null : (s.length ? s[s.length - 1] : null),
      client_cpu_s: cpu, client_cpu_pct: (100 * cpu) / elapsed,
    });
    for (const sock of socks) sock.destroy();
    process.exit(0);
  };
  openManyRaw(args.url, conns, 256, onFrame, (opened, failed) => {
    if (failed) { emit({ error: `${failed} of ${conns} connections failed` }); process.exit(1); }
    socks = opened;
    t0 = now();
    timer = setInterval(sendDue, 1);
    setTimeout(() => {
      phase = 1; winFirst = seq; tStart = now(); cpu0 = process.cpuUsage();
      process.stdout.write('START\n');
      setTimeout(() => {
        sendDue();
        clearInterval(timer);
        phase = 2; winLast = seq; tStop = now(); cpuStop = cpuMs(cpu0) / 1000;
        process.stdout.write('STOP\n');
        const deadline = now() + drainMs;
        const wait = () => (got >= winLast - winFirst || now() > deadline ? finish() : setTimeout(wait, 20));
        wait();
      }, DURATION);
    }, WARMUP);
  });
}

function tcpEcho() {
  const conns = num('conns', 64);
  const size = num('size', 32);
  const payload = Buffer.alloc(size, 0x61);
  const win = new Window();
  let stop = false, opened = 0;
  const socks = [];
  for (let i = 0; i < conns; i++) {
    const s = net.connect({ port: num('port'), host: '127.0.0.1' }, () => {
      s.setNoDelay(true);
      socks.push(s);
      if (++opened === conns) begin();
    });
    s._got = 0;
    s._check = () => {};
    s.on('data', (d) => { s._got += d.length; s._check(); });
    s.on('error', (e) => { emit({ error: String(e) }); process.exit(1); });
  }
  function begin() {
    for (const s of socks) {
      let t = 0;
      s._check = () => {   // a message is complete when `size` bytes came back
        while (s._got >= size) {
          s._got -= size;
          win.record(now() - t, size);
          if (stop) return;
          t = now();
          s.write(payload);
        }
      };
      t = now();
      s.write(payload);
    }
    runWindow(win, () => {
      stop = true;
      win.end({ conns, size });
      for (const s of socks) s.destroy();
      process.exit(0);
    });
  }
}

// Hold connections open and idle: `warm` first (so lazy imports and pools are paid
// before the baseline), then `conns` more. Prints WARM and OPEN, then waits.
function idle(openOne) {
  const warm = num('warm', 100);
  const conns = num('conns', 5000);
  const hold = num('hold', 30) * 1000;
  const held = [];
  const openN = (n, cb) => {
    let done = 0, failed = 0, started = 0;
    const batch = 200;
    const next = () => {
      if (started >= n) return;
      started++;
      openOne((err, s) => {
        if (err) failed++; else held.push(s);
        done++;
        if (done === n) cb(failed); else next();
      });
    };
    for (let i = 0; i < Math.min(batch, n); i++) next();
  };
  openN(warm, (f1) => {
    process.stdout.write(`WARM ${warm - f1}\n`);
    // The runner answers on stdin once it has read the baseline RSS.
    process.stdin.once('data', () => {
      const cpu0 = process.cpuUsage();
      openN(conns, (f2) => {
        process.stdout.write(`OPEN ${conns - f2}\n`);
        emit({ warm: warm - f1, opened: conns - f2, failed: f1 + f2, client_cpu_s: cpuMs(cpu0) / 1000 });
        setTimeout(() => process.exit(0), hold);
      });
    });
  });
}

function wsIdle() {
  idle((cb) => {
    const ws = new WebSocket(args.url, { perMessageDeflate: false });
    let called = false;
    ws.on('open', () => { if (!called) { called = true; cb(null, ws); } });
    ws.on('error', (e) => { if (!called) { called = true; cb(e); } });
  });
}

function httpIdle() {
  // A long-poll that the server holds: the request is sent, no answer is expected.
  // With --first (an SSE stream: --accept=text/event-stream) a connection counts as
  // open once the server's first bytes came, so OPEN means the server has them all.
  const accept = args.accept ? `Accept: ${args.accept}\r\n` : '';
  const req = `GET ${args.path || '/idle'} HTTP/1.1\r\nHost: 127.0.0.1\r\n${accept}\r\n`;
  idle((cb) => {
    let called = false;
    const done = (err, s) => { if (!called) { called = true; cb(err, s); } };
    const s = net.connect({ port: num('port'), host: '127.0.0.1' }, () => {
      s.write(req, () => { if (!args.first) done(null, s); });
    });
    if (args.first) s.once('data', () => done(null, s));
    s.on('error', (e) => done(e));
  });
}

// A minimal WebSocket client over a bare TCP socket. A load client must cost far less
// than the servers it measures: this one reads into one shared buffer (no allocation
// per read), never copies a payload, and sends prebuilt frames with an all-zero mask
// (a valid key; servers still run their unmasking code). It does the opening
// handshake, parses server frames incrementally, answers pings, and calls
// onFrame(opcode, head) at the end of each data frame, where head is a copy of the
// frame's first 16 payload bytes (enough for a round number).
const SHARED_READ = Buffer.allocUnsafe(1 << 20);

function maskedFrame(opcode, payload) {
  const len = payload.length;
  let h;
  if (len < 126) { h = Buffer.alloc(6); h[1] = 0x80 | len; }
  else if (len < 65536) { h = Buffer.alloc(8); h[1] = 0x80 | 126; h.writeUInt16BE(len, 2); }
  else { h = Buffer.alloc(14); h[1] = 0x80 | 127; h.writeBigUInt64BE(BigInt(len), 2); }
  h[0] = 0x80 | opcode;   // FIN; the 4 mask bytes at the end of h stay zero
  return Buffer.concat([h, payload]);
}

function rawWs(url, onFrame, cb) {
  const u = new URL(url);
  const key = Buffer.from(Array.from({ length: 16 }, () => Math.floor(Math.random() * 256))).toString('base64');
  let open = false, called = false, hs = '';
  const hdr = Buffer.alloc(14);
  let hlen = 0, need = 2, remaining = -1, op = 0, head = null, headLen = 0;
  const done = (err) => { if (!called) { called = true; cb(err, s); } };
  const frameBytes = (buf, pos, end) => {
    while (pos < end) {
      if (remaining < 0) {   // reading a header
        while (hlen < need && pos < end) {
          hdr[hlen++] = buf[pos++];
          if (hlen === 2) {
            const l = hdr[1] & 0x7f;
            need = 2 + (l === 126 ? 2 : l === 127 ? 8 : 0) + (hdr[1] & 0x80 ? 4 : 0);
          }
        }
        if (hlen < need) return;
        op = hdr[0] & 0x0f;
        const l = hdr[1] & 0x7f;
        remaining = l === 126 ? hdr.readUInt16BE(2) : l === 127 ? Number(hdr.readBigUInt64BE(2)) : l;
        head = Buffer.alloc(op >= 8 ? remaining : Math.min(16, remaining)); headLen = 0;
        hlen = 0; need = 2;
      }
      const take = Math.min(remaining, end - pos);
      if (headLen < head.length) {
        const c = Math.min(head.length - headLen, take);
        buf.copy(head, headLen, pos, pos + c); headLen += c;
      }
      pos += take; remaining -= take;
      if (remaining === 0) {
        remaining = -1;
        if (op === 0x9) s.write(maskedFrame(0xa, head));
        else if (op === 0x8) s.destroy();
        else if (op === 0x1 || op === 0x2 || op === 0x0) onFrame(op, head, s);
      }
    }
  };
  const s = net.connect({
    host: u.hostname, port: Number(u.port),
    onread: {
      buffer: SHARED_READ,
      callback: (n, buf) => {
        let pos = 0;
        if (!open) {
          hs += buf.toString('latin1', 0, n);
          const i = hs.indexOf('\r\n\r\n');
          if (i < 0) return;
          if (!hs.startsWith('HTTP/1.1 101')) { s.destroy(); done(new Error(hs.split('\r\n')[0])); return; }
          open = true;
          pos = n - (hs.length - (i + 4));
          hs = '';
          done(null);
        }
        frameBytes(buf, pos, n);
      },
    },
  });
  s.setNoDelay(true);
  s.on('connect', () => {
    s.write(`GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\n` +
            `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
  });
  s.on('error', (e) => done(e));
  s.on('close', () => done(new Error('closed before the handshake')));
}

function openManyRaw(url, n, batch, onFrame, done) {
  const socks = [];
  let started = 0, finished = 0, failed = 0;
  const next = () => {
    if (started >= n) return;
    started++;
    rawWs(url, onFrame, (err, s) => {
      if (err) failed++; else socks.push(s);
      if (++finished === n) done(socks, failed); else next();
    });
  };
  for (let i = 0; i < Math.min(batch, n); i++) next();
}

// Fan-out: `subs` subscribers on /sub, one publisher on /pub. Each round the
// publisher sends "<round>:padding"; the round's time is from that send to the moment
// the last subscriber has it. Warm-up rounds repeat until every subscriber gets one.
function wsFanout() {
  const base = args.url.replace(/\/$/, '');
  const subs = num('subs', 1000);
  const rounds = num('rounds', 30);
  const gap = num('gap', 10);
  const budget = num('duration', 10) * 1000;
  let current = -1, got = 0, t0 = 0, timer = null;
  const times = [];
  let onRoundDone = null;
  const onMsg = (op, data) => {
    let r = 0, i = 0;   // the round number is the payload's leading digits
    for (; i < data.length && data[i] >= 48 && data[i] <= 57; i++) r = r * 10 + data[i] - 48;
    if (i === 0 || r !== current) return;
    if (++got === subs) {
      const dt = now() - t0;
      clearTimeout(timer);
      const cb = onRoundDone; onRoundDone = null;
      cb(dt);
    }
  };
  openManyRaw(`${base}/sub`, subs, 200, onMsg, (socks, failed) => {
    if (failed) { emit({ error: `${failed} of ${subs} subscribers failed` }); process.exit(1); }
    const pub = new WebSocket(`${base}/pub`, { perMessageDeflate: false });
    pub.on('error', (e) => { emit({ error: 'publisher: ' + e }); process.exit(1); });
    pub.on('open', () => {
      let round = 0;
      const pad = 'x'.repeat(24);
      const publish = (cb, waitMs) => {
        current = round++; got = 0;
        onRoundDone = cb;
        timer = setTimeout(() => { onRoundDone = null; cb(null); }, waitMs);
        t0 = now();
        pub.send(`${current}:${pad}`);
      };
      let warmTries = 0;
      const warm = () => publish((dt) => {
        if (dt === null) {
          if (++warmTries > 10) {
            const closed = socks.filter((x) => x.destroyed).length;
            emit({ error: `warm-up broadcast never reached all ${subs} subscribers (last round: ${got}; ${closed} subscriber sockets closed; publisher ${pub.readyState === WebSocket.OPEN ? 'open' : 'closed'})` });
            process.exit(1);
          }
          return setTimeout(warm, 200);
        }
        measure();
      }, 2000);
      let cpu0, tStart, lost = 0;
      const measure = () => {
        process.stdout.write('START\n');
        cpu0 = process.cpuUsage(); tStart = now();
        const one = () => {
          if (times.length + lost >= rounds || now() - tStart > budget) return finish();
          publish((dt) => {
            if (dt === null) lost++; else times.push(dt);
            setTimeout(one, gap);
          }, 5000);
        };
        one();
      };
      const finish = () => {
        const elapsed = (now() - tStart) / 1000;
        const cpu = cpuMs(cpu0) / 1000;
        const s = Float64Array.from(times).sort();
        emit({
          subs, rounds: times.length, lost,
          p50_ms: percentile(s, 50), p99_ms: percentile(s, 99),
          min_ms: s.length ? s[0] : null, max_ms: s.length ? s[s.length - 1] : null,
          elapsed_s: elapsed, client_cpu_s: cpu, client_cpu_pct: (100 * cpu) / elapsed,
        });
        pub.terminate();
        for (const sock of socks) sock.destroy();
        process.exit(0);
      };
      warm();
    });
  });
}

// Across processes: subscribers spread round-robin over several servers (--urls, comma
// separated bases) that share one Redis; one publisher on the first. --proto=gc speaks
// plain WebSocket (/sub, /pub); --proto=sio speaks Socket.IO 5 over its WebSocket
// transport (the engine.io handshake, "40" to join the namespace, "42[...]" events,
// "3" to each ping). Two phases on the same connections:
//  1. latency: `rounds` broadcasts one at a time, from the publisher's send to the
//     last subscriber's receipt (as ws-fanout);
//  2. rate: the publisher keeps `window` broadcasts in flight for `rate-duration`
//     seconds; a broadcast is done when every subscriber has it; broadcasts done per
//     second is the figure. START and STOP bound this phase (server CPU).
function clusterFanout() {
  const bases = String(args.urls).split(',').map((u) => u.replace(/\/$/, ''));
  const sio = args.proto === 'sio';
  const subs = num('subs', 1000);
  const rounds = num('rounds', 40);
  const budget = num('duration', 15) * 1000;
  const window_ = num('window', 32);
  const rateMs = num('rate-duration', 5) * 1000;
  const gap = num('gap', 10);
  const RING = 4096;
  const count = new Int32Array(RING);
  const sentAt = new Float64Array(RING);
  const ringSeq = new Float64Array(RING).fill(-1);
  let seq = 0, joined = 0, phase = 0;   // 0 warm-up and latency, 1 rate
  let onDone = null, latSeq = -1;
  const prefix = sio ? 8 : 0;   // 42["m","
  const subUrl = (b) => (sio ? `${b}/socket.io/?EIO=4&transport=websocket&role=sub` : `${b}/sub`);
  const pubUrl = (b) => (sio ? `${b}/socket.io/?EIO=4&transport=websocket&role=pub` : `${b}/pub`);
  const PONG = maskedFrame(0x1, Buffer.from('3'));
  const JOIN = maskedFrame(0x1, Buffer.from('40'));
  let rateDone = 0, rateLost = 0, rateStart = 0, inFlight = 0, stopRate = false, publish = null;
  const complete = (r) => {
    const i = r % RING;
    if (ringSeq[i] !== r) return;
    ringSeq[i] = -1;
    if (phase === 0) { if (r === latSeq && onDone) { const cb = onDone; onDone = null; cb(now() - sentAt[i]); } return; }
    rateDone++; inFlight--;
    pump();
  };
  const onFrame = (op, head, sock) => {
    if (sio) {
      if (head.length === 1 && head[0] === 0x32) { sock.write(PONG); return; }   // ping
      if (head[0] === 0x34 && head[1] === 0x30) { if (!sock._joined) { sock._joined = true; joined++; } return; }
      if (head[0] === 0x30) { sock.write(JOIN); return; }   // engine.io open: join "/"
      if (head[0] !== 0x34 || head[1] !== 0x32) return;
    }
    let r = 0, i = prefix;
    for (; i < head.length && head[i] >= 48 && head[i] <= 57; i++) r = r * 10 + head[i] - 48;
    if (i === prefix) return;
    const k = r % RING;
    if (ringSeq[k] !== r) return;
    if (++count[k] === subs) complete(r);
  };
  const send = (pub) => {
    const r = seq++;
    const k = r % RING;
    count[k] = 0; ringSeq[k] = r; sentAt[k] = now();
    const text = sio ? `42["pub","${r}:xxxxxxxxxxxxxxxxxxxxxxxx"]` : `${r}:xxxxxxxxxxxxxxxxxxxxxxxx`;
    pub.write(maskedFrame(0x1, Buffer.from(text)));
    return r;
  };
  const pump = () => {
    while (!stopRate && inFlight < window_) { inFlight++; send(publish); }
  };
  const urls = [];
  for (let i = 0; i < subs; i++) urls.push(subUrl(bases[i % bases.length]));
  const socks = [];
  let started = 0, finished = 0, failed = 0;
  const next = () => {
    if (started >= subs) return;
    const u = urls[started++];
    rawWs(u, onFrame, (err, s) => {
      if (err) failed++; else { socks.push(s); if (!sio) joined++; }
      if (++finished === subs) allOpen(); else next();
    });
  };
  for (let i = 0; i < Math.min(200, subs); i++) next();
  const allOpen = () => {
    if (failed) { emit({ error: `${failed} of ${subs} subscribers failed` }); process.exit(1); }
    const t = now();
    const waitJoin = () => {
      if (joined >= subs) return openPub();
      if (now() - t > 20000) { emit({ error: `only ${joined} of ${subs} subscribers joined` }); process.exit(1); }
      setTimeout(waitJoin, 20);
    };
    waitJoin();
  };
  const openPub = () => {
    let pubJoined = !sio;
    rawWs(pubUrl(bases[0]), (op, head, sock) => {
      if (!sio) return;
      if (head.length === 1 && head[0] === 0x32) sock.write(PONG);
      else if (head[0] === 0x30) sock.write(JOIN);
      else if (head[0] === 0x34 && head[1] === 0x30) pubJoined = true;
    }, (err, pub) => {
      if (err) { emit({ error: 'publisher: ' + err }); process.exit(1); }
      publish = pub;
      const t = now();
      const w = () => (pubJoined ? latency() : now() - t > 10000
        ? (emit({ error: 'publisher never joined' }), process.exit(1)) : setTimeout(w, 10));
      w();
    });
  };
  const times = [];
  let lost = 0, warmTries = 0;
  const one = (cb, waitMs) => {
    let fired = false;
    const timer = setTimeout(() => { if (!fired) { fired = true; onDone = null; cb(null); } }, waitMs);
    onDone = (dt) => { if (!fired) { fired = true; clearTimeout(timer); cb(dt); } };
    latSeq = send(publish);
  };
  const latency = () => {
    const warm = () => one((dt) => {
      if (dt === null) {
        if (++warmTries > 10) {
          emit({ error: `warm-up broadcast never reached all ${subs} subscribers (last: ${count[latSeq % RING]})` });
          process.exit(1);
        }
        return setTimeout(warm, 200);
      }
      setTimeout(measure, 200);
    }, 3000);
    let tStart = 0;
    const measure = () => {
      tStart = now();
      const step = () => {
        if (times.length + lost >= rounds || now() - tStart > budget) return rate();
        one((dt) => { if (dt === null) lost++; else times.push(dt); setTimeout(step, gap); }, 5000);
      };
      step();
    };
    warm();
  };
  const rate = () => {
    phase = 1;
    ringSeq.fill(-1);
    let cpu0 = null;
    setTimeout(() => {
      cpu0 = process.cpuUsage(); rateStart = now();
      process.stdout.write('START\n');
      pump();
      // A broadcast some subscriber never gets would hold its slot for ever: after
      // 3 s it is counted lost and its slot freed.
      const sweep = setInterval(() => {
        const t = now();
        for (let k = 0; k < RING; k++) {
          if (ringSeq[k] >= 0 && t - sentAt[k] > 3000) { ringSeq[k] = -1; rateLost++; inFlight--; }
        }
        pump();
      }, 500);
      setTimeout(() => {
        stopRate = true;
        clearInterval(sweep);
        const elapsed = (now() - rateStart) / 1000;
        const done = rateDone;
        const cpu = cpuMs(cpu0) / 1000;
        process.stdout.write('STOP\n');
        const s = Float64Array.from(times).sort();
        setTimeout(() => {
          emit({
            subs, servers: bases.length, proto: sio ? 'sio' : 'gc',
            rounds: times.length, lost,
            p50_ms: percentile(s, 50), p99_ms: percentile(s, 99),
            min_ms: s.length ? s[0] : null, max_ms: s.length ? s[s.length - 1] : null,
            window: window_, published: done, rate: done / elapsed, rate_lost: rateLost,
            deliveries_per_s: (done * subs) / elapsed,
            elapsed_s: elapsed, client_cpu_s: cpu, client_cpu_pct: (100 * cpu) / elapsed,
          });
          for (const x of socks) x.destroy();
          publish.destroy();
          process.exit(0);
        }, 50);
      }, rateMs);
    }, 300);
  };
}

// HTTP requests/s: `conns` keep-alive connections, each a closed loop of GETs. The
// body is read to its end (Content-Length or chunked), so streaming responses count
// only when complete.
function httpLoad() {
  const conns = num('conns', 64);
  const path = args.path || '/poll';
  const agent = new http.Agent({ keepAlive: true, maxSockets: conns, maxFreeSockets: conns });
  const win = new Window();
  let stop = false, errors = 0, bad = 0;
  const loop = () => {
    if (stop) return;
    const t = now();
    const req = http.request({ host: '127.0.0.1', port: num('port'), path, agent }, (res) => {
      let n = 0;
      res.on('data', (d) => { n += d.length; });
      res.on('end', () => {
        if (res.statusCode !== 200) bad++;
        win.record(now() - t, n);
        loop();
      });
    });
    req.on('error', () => { errors++; if (!stop) setTimeout(loop, 10); });
    req.end();
  };
  for (let i = 0; i < conns; i++) loop();
  runWindow(win, () => {
    stop = true;
    win.end({ conns, path, errors, non_200: bad, reused: null });
    process.exit(0);
  });
}

const modes = {
  'ws-echo': wsEcho, 'ws-echo-raw': wsEchoRaw, 'ws-echo-open': wsEchoOpen, 'tcp-echo': tcpEcho, 'ws-idle': wsIdle, 'http-idle': httpIdle,
  'ws-fanout': wsFanout, 'cluster-fanout': clusterFanout, 'http': httpLoad,
};
if (args.version) {
  const fs = require('fs');
  const pkg = (n) => JSON.parse(fs.readFileSync(`${__dirname}/node_modules/${n}/package.json`)).version;
  emit({ node: process.version, ws: pkg('ws'), bufferutil: pkg('bufferutil') });
  process.exit(0);
}
const fn = modes[args.mode];
if (!fn) { emit({ error: `unknown --mode=${args.mode}; one of ${Object.keys(modes).join(', ')}` }); process.exit(1); }
fn();
