/*! greenchan.js: the browser side of a greenchan channel. No build step, no
 * dependencies, plain ES2017. Serve it with `greenchan.static.javascript`.
 *
 *   var chan = greenchan.connect("/chat?room=lobby", {transports: ["websocket", "sse", "longpoll"]});
 *   chan.onopen = function (e) { console.log("open over", chan.transport); };
 *   chan.onmessage = function (e) { console.log(e.data); };
 *   chan.onreconnecting = function (e) { console.log("reconnecting in", e.delay, "ms"); };
 *   chan.ondrop = function (e) { console.log("not sent:", e.data, e.reason); };
 *   chan.send("hello");   // false (and ondrop) when it cannot be queued
 *
 * chan.onresume = function (e) { ... }  // after a reconnect: e.recovered (and e.group)
 *
 * WIRE CONVENTION: sessions (docs/sessions.md has it whole)
 *
 * Every request goes to the URL given to connect(), with query parameters:
 *   gc_cid        128 random bits (crypto.getRandomValues), the same for the whole
 *                 life of the connect() object: the server ties every request that
 *                 carries it to one session, one channel, one run of the handler.
 *   gc_transport  "websocket" | "sse" | "longpoll"
 *   gc_sid        the session instance named by the server's last hello
 *   gc_ack        how many frames of that instance this client has received
 *   gc_next       the number of the oldest message not yet confirmed by the server
 *   gc_seq        (POST) the number of the message in the body; gc_close=1 ends it
 *   gc_open=1     the first long-poll GET of a connection: answered at once
 *   gc_last       per group, the id of the last message received, space separated
 *
 * The server numbers what it sends (frames: messages, and control frames as JSON)
 * and resends on every reconnect what comes after gc_ack; every carrier starts
 * with a "hello" {sid, new, in} ("in": client messages received so far), after
 * which the client resends its messages after "in". So every message reaches the
 * other side once and in order, over any transport, across drops.
 *
 * WebSocket   text and binary frames are messages; a text frame starting with
 *             U+0000 is a control frame (JSON after it); a message that starts
 *             with U+0000 gets a second one in front, both ways. Acks both ways:
 *             {"ack": n}. Closing with code 1000 ends the session.
 * SSE         unnamed events are text messages; "gct" a text as a JSON string
 *             (one with a CR); "gcb" binary in base64; "gc" a control frame.
 *             Acks: an empty POST with gc_ack.
 * long-poll   GET answered 200 {"hello"?, "from": n, "f": [frame...]}, a frame
 *             being a string, {"b": base64} or {"c": control}.
 * POST        one message per POST, in order; 200 {"in": n} confirms it.
 * Refused     a POST answered 4xx (413...) or a WebSocket closed with 1009: that
 *             message was not counted; it goes to ondrop, the next takes its number.
 *
 * Plain clients (curl, a plain EventSource or WebSocket) send no gc_cid and get
 * plain channels, one per request or connection.
 */
(function (root) {
  "use strict";

  var DEFAULTS = {
    // Tried in this order; the one that last worked is tried first on reconnects.
    transports: ["websocket", "sse", "longpoll"],
    // WebSocket subprotocols (string or array), passed to the WebSocket constructor.
    protocols: undefined,
    // How long a transport may take to open before the next one is tried.
    connectTimeout: 10000,
    reconnect: true,
    // Backoff: min(maxReconnectDelay, reconnectDelay * 2^attempt), minus up to
    // `reconnectJitter` of it at random so that clients of a restarted server do
    // not all come back in the same millisecond.
    reconnectDelay: 1000,
    maxReconnectDelay: 30000,
    reconnectJitter: 0.5,
    maxReconnectAttempts: Infinity,
    // The backoff starts over once a connection has stayed open this long, so a
    // server that accepts and at once drops the connection is not hammered.
    stableAfter: 5000,
    // Messages kept while disconnected (or waiting for their POST); beyond it
    // send() returns false and `ondrop` fires.
    maxQueue: 100,
    // A long-poll GET that takes longer than this is abandoned and repeated
    // (servers answer 204 well before; this only catches dead connections).
    pollTimeout: 60000,
    // A POST that takes longer than this counts as a lost connection.
    postTimeout: 30000,
    // Sent with the HTTP fallback requests (EventSource cannot send headers).
    withCredentials: false,
    lastEventId: ""
  };

  var EVENTS = ["open", "message", "close", "reconnecting", "error", "drop", "resume"];

  function randomId() {
    // 128 bits: the client id is a capability (whoever has it can read the session).
    var bytes = new Uint8Array(16);
    root.crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) {
      return (b < 16 ? "0" : "") + b.toString(16);
    }).join("");
  }

  function isBinary(data) {
    return (typeof ArrayBuffer !== "undefined" && (data instanceof ArrayBuffer || ArrayBuffer.isView(data))) ||
      (typeof Blob !== "undefined" && data instanceof Blob);
  }

  function fromBase64(text) {
    var bin = root.atob(text);
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }

  function available(name) {
    if (name === "websocket") return !!root.WebSocket;
    if (name === "sse") return !!root.EventSource && !!root.fetch;
    if (name === "longpoll") return !!root.fetch;
    return false;
  }

  // ---------------------------------------------------------------- transports
  // A driver opens one transport once. It reports `hello(h)` when the server's
  // hello arrives (that opens it), then `frame(f)` for each frame, then `down(info)`
  // exactly once (whether it ever opened or not), unless the connection stops it first.

  function Driver(conn, name) {
    this.conn = conn;
    this.name = name;
    this.opened = false;
    this.done = false;
    this.timer = null;
  }
  Driver.prototype.startTimer = function () {
    var self = this;
    this.timer = setTimeout(function () {
      self.fail({reason: self.name + " did not open within " + self.conn.options.connectTimeout + " ms"});
    }, this.conn.options.connectTimeout);
  };
  Driver.prototype.hello = function (h) {
    if (this.done) return;
    clearTimeout(this.timer);
    var first = !this.opened;
    this.opened = true;
    this.conn._hello(this, h, first);
  };
  Driver.prototype.frame = function (f) {
    if (!this.done) this.conn._frame(this, f);
  };
  Driver.prototype.fail = function (info) {
    if (this.done) return;
    this.stop();
    this.conn._driverDown(this, info || {});
  };
  Driver.prototype.stop = function () {
    this.done = true;
    clearTimeout(this.timer);
    clearTimeout(this.ackTimer);
    this.close();
  };

  function WebSocketDriver(conn) {
    Driver.call(this, conn, "websocket");
    var self = this;
    var url = conn._url("websocket", {});
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    this.startTimer();
    try {
      this.ws = conn.options.protocols ? new root.WebSocket(url.href, conn.options.protocols) : new root.WebSocket(url.href);
    } catch (err) {
      this.ws = null;
      setTimeout(function () { self.fail({reason: String(err)}); }, 0);
      return;
    }
    this.ws.binaryType = "arraybuffer";
    this.ws.onmessage = function (e) {
      var data = e.data;
      if (typeof data === "string" && data.charCodeAt(0) === 0) {
        if (data.charCodeAt(1) !== 0) {
          var c = JSON.parse(data.slice(1));
          if (c.hello) self.hello(c.hello);
          else if (typeof c.ack === "number") self.conn._confirm(c.ack);
          else self.frame({c: c});
          return;
        }
        data = data.slice(1);
      }
      self.frame({m: data});
    };
    this.ws.onclose = function (e) {
      self.fail({code: e.code, reason: e.reason || "websocket closed", wasClean: e.wasClean});
    };
  }
  WebSocketDriver.prototype = Object.create(Driver.prototype);
  WebSocketDriver.prototype.flush = function () {
    // Everything not yet written on this socket, in order (kept until confirmed).
    var q = this.conn._queue;
    var ws = this.ws;
    if (!this.opened || this.done || !ws || ws.readyState !== 1) return;
    for (var i = 0; i < q.length; i++) {
      if (q[i].ws === this) continue;
      var data = q[i].data;
      ws.send(typeof data === "string" && data.charCodeAt(0) === 0 ? "\u0000" + data : data);
      q[i].ws = this;
    }
  };
  WebSocketDriver.prototype.ack = function (n) {
    if (this.ws && this.ws.readyState === 1) this.ws.send("\u0000" + JSON.stringify({ack: n}));
  };
  WebSocketDriver.prototype.close = function (code) {
    var ws = this.ws;
    this.ws = null;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    // 1000 ends the session on the server; anything else is a drop it waits out.
    try { ws.close(code || 4000, code ? "closed by the client" : "reconnecting"); } catch (err) { /* closing */ }
  };

  // The HTTP fallbacks share the POST pump: one request at a time, in order.
  function HttpDriver(conn, name) {
    Driver.call(this, conn, name);
    this.posting = false;
    this.aborts = [];
  }
  HttpDriver.prototype = Object.create(Driver.prototype);
  HttpDriver.prototype.request = function (url, init, timeout) {
    // fetch with a deadline; the abort controller is kept so stop() can cancel it.
    var ctrl = new AbortController();
    var aborts = this.aborts;
    var timedOut = false;
    aborts.push(ctrl);
    init.signal = ctrl.signal;
    init.cache = "no-store";
    init.credentials = this.conn.options.withCredentials ? "include" : "same-origin";
    var timer = setTimeout(function () { timedOut = true; ctrl.abort(); }, timeout);
    function settle() {
      clearTimeout(timer);
      var i = aborts.indexOf(ctrl);
      if (i >= 0) aborts.splice(i, 1);
    }
    return root.fetch(url.href, init).then(function (resp) {
      settle();
      return resp;
    }, function (err) {
      settle();
      err.timedOut = timedOut;
      throw err;
    });
  };
  HttpDriver.prototype.flush = function () {
    var self = this;
    var conn = this.conn;
    if (this.posting || this.done || !this.opened || !conn._queue.length) return;
    var entry = conn._queue[0];
    var binary = isBinary(entry.data);
    this.posting = true;
    this.request(conn._url(this.name, {gc_seq: entry.seq}), {
      method: "POST",
      body: entry.data,
      headers: {"Content-Type": binary ? "application/octet-stream" : "text/plain;charset=UTF-8"}
    }, conn.options.postTimeout).then(function (resp) {
      self.posting = false;
      if (self.done) return;
      var s = resp.status;
      if (resp.ok) {
        return resp.json().then(function (body) {
          if (self.done) return;
          if (body.sid === conn._sid) conn._confirm(body["in"]);
          if (conn._queue[0] === entry) conn._queue.shift();  // delivered, or seen before
          self.flush();
        });
      }
      if (s === 410) {
        conn._finish({code: 1000, reason: "closed by the server", wasClean: true});
      } else if (s >= 400 && s < 500 && s !== 408 && s !== 409 && s !== 429) {
        if (conn._queue[0] === entry) {
          conn._queue.shift();
          conn._renumber(entry.seq);
        }
        conn._drop(entry.data, "rejected by the server: HTTP " + s);
        self.flush();
      } else {
        self.fail({code: s, reason: "POST answered HTTP " + s});
      }
    }).catch(function (err) {
      self.posting = false;
      self.fail({reason: "POST failed: " + (err && err.timedOut ? "timed out" : err && err.message)});
    });
  };
  HttpDriver.prototype.ack = function () {
    // An empty POST that only acknowledges (SSE; long-polls acknowledge with the next GET).
    if (this.name !== "sse") return;
    this.request(this.conn._url("sse", {}), {method: "POST", body: ""}, this.conn.options.postTimeout)
      .catch(function () { /* the next one, or the reconnect, carries it */ });
  };
  HttpDriver.prototype.close = function () {
    var aborts = this.aborts.splice(0);
    aborts.forEach(function (ctrl) { ctrl.abort(); });
  };

  function SseDriver(conn) {
    HttpDriver.call(this, conn, "sse");
    var self = this;
    this.startTimer();
    this.es = new root.EventSource(conn._url("sse", {}).href, {withCredentials: !!conn.options.withCredentials});
    this.es.onmessage = function (e) { self.frame({m: e.data}); };
    this.es.addEventListener("gct", function (e) { self.frame({m: JSON.parse(e.data)}); });
    this.es.addEventListener("gcb", function (e) { self.frame({m: fromBase64(e.data)}); });
    this.es.addEventListener("gc", function (e) {
      var c = JSON.parse(e.data);
      if (c.hello) self.hello(c.hello);
      else self.frame({c: c});
    });
    // EventSource would reconnect by itself, without backoff or our events: stop it.
    this.es.onerror = function () { self.fail({reason: "event stream ended"}); };
  }
  SseDriver.prototype = Object.create(HttpDriver.prototype);
  SseDriver.prototype.close = function () {
    HttpDriver.prototype.close.call(this);
    var es = this.es;
    this.es = null;
    if (!es) return;
    es.onmessage = es.onerror = null;
    es.close();
  };

  function LongPollDriver(conn) {
    HttpDriver.call(this, conn, "longpoll");
    this.poll(true);
  }
  LongPollDriver.prototype = Object.create(HttpDriver.prototype);
  LongPollDriver.prototype.poll = function (opening) {
    var self = this;
    var conn = this.conn;
    if (this.done) return;
    var timeout = opening ? conn.options.connectTimeout : conn.options.pollTimeout;
    this.request(conn._url("longpoll", opening ? {gc_open: "1"} : {}), {
      method: "GET",
      headers: {"Accept": "application/json"}
    }, timeout).then(function (resp) {
      if (self.done) return;
      if (!resp.ok) {
        self.fail({code: resp.status, reason: "poll answered HTTP " + resp.status});
        return;
      }
      return resp.json().then(function (body) {
        if (self.done) return;
        if (body.hello) self.hello(body.hello);
        else if (!self.opened) throw new Error("no hello");
        // Frames before what this client has are already taken (a stale ack).
        var skip = conn._recv - body.from;
        for (var i = Math.max(0, skip); i < body.f.length && !self.done; i++) {
          var f = body.f[i];
          if (typeof f === "string") self.frame({m: f});
          else if (f.b !== undefined) self.frame({m: fromBase64(f.b)});
          else self.frame({c: f.c});
        }
        self.poll(false);
      });
    }).catch(function (err) {
      if (self.done) return;
      if (err && err.timedOut && !opening) self.poll(false);
      else self.fail({reason: "poll failed: " + (err && err.timedOut ? "timed out" : err && err.message)});
    });
  };

  var DRIVERS = {websocket: WebSocketDriver, sse: SseDriver, longpoll: LongPollDriver};

  // ---------------------------------------------------------------- connection

  /** One logical channel to `url` that survives transport changes and reconnects. */
  function Connection(url, options) {
    var opts = {};
    Object.keys(DEFAULTS).forEach(function (k) { opts[k] = DEFAULTS[k]; });
    Object.keys(options || {}).forEach(function (k) { if (options[k] !== undefined) opts[k] = options[k]; });
    this.options = opts;
    this.url = new URL(url, root.location ? root.location.href : undefined);
    if (this.url.protocol === "ws:") this.url.protocol = "http:";
    if (this.url.protocol === "wss:") this.url.protocol = "https:";
    this.transports = (opts.transports || []).filter(function (t) { return DRIVERS[t]; });
    this.clientId = randomId();
    // Per group, the id of the last message received: what a new session resumes from.
    this.lastEventIds = {};
    this.lastEventId = opts.lastEventId || "";
    this.transport = null;  // "websocket" | "sse" | "longpoll" while open, else the last one
    this.state = "connecting";  // "connecting" | "open" | "reconnecting" | "closed"
    this.reconnectAttempt = 0;
    // Messages not yet confirmed by the server: {seq, data, ws}.
    this._queue = [];
    this._seq = 0;  // the number of the last message queued
    this._sid = "";  // the session instance of the last hello
    this._recv = 0;  // frames of that instance received
    this._acked = 0;  // the last count acknowledged
    this._ackBytes = 0;
    this._ackTimer = null;
    this._nextId = null;  // the group and id of the next message
    this._tooBig = false;  // the last WebSocket was closed with 1009
    this._driver = null;
    this._order = [];
    this._next = 0;
    this._preferred = 0;
    this._timer = null;
    this._stableTimer = null;
    this._everOpened = false;
    this._listeners = {};
    var self = this;
    EVENTS.forEach(function (name) { self["on" + name] = null; });
    this._online = function () { if (self.state === "reconnecting") self._cycle(); };
    if (root.addEventListener) root.addEventListener("online", this._online);
    setTimeout(function () { self._cycle(); }, 0);  // let the page set its handlers first
  }

  Connection.prototype.addEventListener = function (name, fn) {
    (this._listeners[name] = this._listeners[name] || []).push(fn);
  };
  Connection.prototype.removeEventListener = function (name, fn) {
    var list = this._listeners[name] || [];
    var i = list.indexOf(fn);
    if (i >= 0) list.splice(i, 1);
  };
  Connection.prototype._emit = function (name, event) {
    event.type = name;
    event.target = this;
    var fns = (this._listeners[name] || []).slice();
    if (typeof this["on" + name] === "function") fns.unshift(this["on" + name]);
    for (var i = 0; i < fns.length; i++) {
      try { fns[i].call(this, event); } catch (err) {
        // A page's handler must not break the connection; report it like the browser does.
        setTimeout(function () { throw err; }, 0);
      }
    }
  };

  /** Queues `data` (a string or binary) until the server confirms it; false when it cannot. */
  Connection.prototype.send = function (data) {
    if (this.state === "closed") {
      this._drop(data, "closed");
      return false;
    }
    if (this._queue.length >= this.options.maxQueue) {
      this._drop(data, "queue full (" + this.options.maxQueue + " messages)");
      return false;
    }
    this._queue.push({seq: ++this._seq, data: data, ws: null});
    var d = this._driver;
    if (d && d.opened) d.flush();
    return true;
  };

  /** Messages accepted by send() and not yet confirmed by the server. */
  Object.defineProperty(Connection.prototype, "queued", {get: function () { return this._queue.length; }});

  /** Closes for good (the server's on_close runs now); unsent messages go to `ondrop`. */
  Connection.prototype.close = function () {
    if (this.state === "closed") return;
    var d = this._driver;
    if (d && d.name === "websocket" && d.opened) {
      this._driver = null;
      d.done = true;
      clearTimeout(d.timer);
      d.close(1000);
    } else if (this._sid && root.fetch) {
      root.fetch(this._url(this.transport || "longpoll", {gc_close: "1"}).href,
        {method: "POST", keepalive: true, cache: "no-store",
         credentials: this.options.withCredentials ? "include" : "same-origin"}).catch(function () {});
    }
    this._finish({code: 1000, reason: "closed by the client", wasClean: true});
  };

  /** Skips the wait of a scheduled reconnect. */
  Connection.prototype.reconnectNow = function () {
    if (this.state === "reconnecting") this._cycle();
  };

  Connection.prototype._url = function (transport, extra) {
    var u = new URL(this.url.href);
    var p = u.searchParams;
    p.set("gc_transport", transport);
    p.set("gc_cid", this.clientId);
    if (this._sid) p.set("gc_sid", this._sid);
    p.set("gc_ack", String(this._recv));
    p.set("gc_next", String(this._queue.length ? this._queue[0].seq : this._seq + 1));
    var ids = Object.keys(this.lastEventIds).map(function (g) { return this.lastEventIds[g]; }, this);
    var last = ids.length ? ids.join(" ") : this.lastEventId;
    if (last) p.set("gc_last", last);
    Object.keys(extra).forEach(function (k) { p.set(k, extra[k]); });
    if (this._sid) this._acked = this._recv;
    return u;
  };

  Connection.prototype._cycle = function () {
    // One round over the usable transports, starting with the one that last worked.
    clearTimeout(this._timer);
    this._timer = null;
    if (this.state === "closed") return;
    var usable = this.transports.filter(available);
    if (!usable.length) {
      this._emit("error", {message: "no usable transport among " + JSON.stringify(this.transports)});
      this._finish({code: 1006, reason: "no usable transport", wasClean: false});
      return;
    }
    var start = Math.max(0, usable.indexOf(this.transports[this._preferred]));
    this._order = usable.slice(start).concat(usable.slice(0, start));
    this._next = 0;
    if (this.state !== "connecting") this.state = "connecting";
    this._tryNext({});
  };

  Connection.prototype._tryNext = function (info) {
    if (this._next >= this._order.length) {
      this._scheduleReconnect(info);
      return;
    }
    var name = this._order[this._next++];
    this._driver = new DRIVERS[name](this);
  };

  Connection.prototype._hello = function (driver, h, first) {
    if (driver !== this._driver) return;
    var resumed = null;
    if (h.sid !== this._sid) {
      // A session instance this client has not seen: count its frames from 0.
      if (this._sid) resumed = false;
      this._sid = h.sid;
      this._recv = 0;
      this._acked = 0;
    } else if (this._everOpened && first) {
      resumed = true;  // the same session: what was missed comes now
    }
    this._confirm(h["in"]);
    if (this._tooBig) {
      // The first message the server has not got is the one it refused: sent
      // again, it would close the socket again, on every reconnect.
      this._tooBig = false;
      var big = this._queue.shift();
      if (big) {
        this._renumber(big.seq);
        this._drop(big.data, "rejected by the server: too big (WebSocket close 1009)");
      }
    }
    this._queue.forEach(function (entry) { entry.ws = null; });
    if (!first) return;
    var reconnected = this._everOpened;
    this._everOpened = true;
    this.state = "open";
    this.transport = driver.name;
    this._preferred = this.transports.indexOf(driver.name);
    var self = this;
    clearTimeout(this._stableTimer);
    this._stableTimer = setTimeout(function () { self.reconnectAttempt = 0; }, this.options.stableAfter);
    driver.flush();  // what was queued goes before what onopen sends
    this._emit("open", {transport: driver.name, reconnected: reconnected});
    if (resumed === true) this._emit("resume", {recovered: true, group: null});
  };

  Connection.prototype._renumber = function (seq) {
    // The server refused message `seq` (413, 403...) without counting it: the ones
    // after it move up a number, or the next would skip one and get 409 forever.
    var q = this._queue;
    for (var i = 0; i < q.length; i++) if (q[i].seq > seq) q[i].seq -= 1;
    this._seq -= 1;
  };

  Connection.prototype._confirm = function (n) {
    var q = this._queue;
    while (q.length && q[0].seq <= n) q.shift();
  };

  Connection.prototype._frame = function (driver, f) {
    if (driver !== this._driver) return;
    this._recv += 1;
    if (f.c) {
      var c = f.c;
      if (c.id) this._nextId = c.id;
      else if (c.pos) this._setId(c.pos[0], c.pos[1]);
      else if (c.resume) this._emit("resume", {group: c.resume[0], recovered: !!c.resume[1]});
      else if (c.close) {
        this._finish({code: c.close[0], reason: c.close[1], wasClean: true});
        return;
      }
    } else {
      var id = "";
      if (this._nextId) {
        id = this._nextId[1];
        this._setId(this._nextId[0], id);
        this._nextId = null;
      }
      var data = f.m;
      this._ackBytes += typeof data === "string" ? data.length : data.byteLength;
      this._emit("message", {data: data, lastEventId: id, transport: driver.name});
    }
    this._scheduleAck(driver);
  };

  Connection.prototype._setId = function (group, id) {
    this.lastEventIds[group] = id;
    this.lastEventId = id;
  };

  Connection.prototype._scheduleAck = function (driver) {
    // The server keeps each frame until acknowledged: every 8 frames or 32 KiB,
    // and soon after the first one (long-polls acknowledge with their next GET).
    if (driver.name === "longpoll" || this.state === "closed") return;
    var self = this;
    if (this._recv - this._acked >= 8 || this._ackBytes >= 32768) {
      this._sendAck(driver);
    } else if (!this._ackTimer) {
      this._ackTimer = setTimeout(function () { self._sendAck(driver); }, driver.name === "sse" ? 500 : 200);
    }
  };

  Connection.prototype._sendAck = function (driver) {
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    this._ackBytes = 0;
    if (driver !== this._driver || this._recv === this._acked) return;
    this._acked = this._recv;
    driver.ack(this._recv);
  };

  Connection.prototype._driverDown = function (driver, info) {
    if (driver !== this._driver) return;
    this._driver = null;
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    info.transport = driver.name;
    clearTimeout(this._stableTimer);
    // 1009: the server refused a message too big for it, without counting it.
    if (driver.opened && info.code === 1009) this._tooBig = true;
    if (driver.opened) {
      this._emit("error", {message: driver.name + " connection lost: " + (info.reason || "")});
      this._scheduleReconnect(info);
    } else {
      this._tryNext(info);
    }
  };

  Connection.prototype._scheduleReconnect = function (info) {
    var o = this.options;
    if (!o.reconnect || this.reconnectAttempt >= o.maxReconnectAttempts) {
      this._finish({code: info.code || 1006, reason: info.reason || "connection lost", wasClean: false});
      return;
    }
    var base = Math.min(o.maxReconnectDelay, o.reconnectDelay * Math.pow(2, this.reconnectAttempt));
    var delay = Math.round(base * (1 - o.reconnectJitter * Math.random()));
    this.reconnectAttempt += 1;
    this.state = "reconnecting";
    var self = this;
    this._timer = setTimeout(function () { self._cycle(); }, delay);
    this._emit("reconnecting", {
      delay: delay, attempt: this.reconnectAttempt, at: Date.now() + delay,
      queued: this._queue.length, reason: info.reason || "", code: info.code
    });
  };

  Connection.prototype._drop = function (data, reason) {
    this._emit("drop", {data: data, reason: reason});
  };

  Connection.prototype._finish = function (event) {
    if (this.state === "closed") return;
    this.state = "closed";
    clearTimeout(this._timer);
    clearTimeout(this._stableTimer);
    clearTimeout(this._ackTimer);
    if (root.removeEventListener) root.removeEventListener("online", this._online);
    var d = this._driver;
    this._driver = null;
    if (d) d.stop();
    var left = this._queue.splice(0);
    for (var i = 0; i < left.length; i++) this._drop(left[i].data, "closed before it could be sent");
    this._emit("close", event);
  };

  root.greenchan = {
    version: "2",
    connect: function (url, options) { return new Connection(url, options); },
    Connection: Connection,
    defaults: DEFAULTS
  };
})(typeof window !== "undefined" ? window : this);
