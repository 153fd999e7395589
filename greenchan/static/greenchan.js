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
 * WIRE CONVENTION (what a greenchan handler sees; one URL serves every transport)
 *
 * Every request the client makes goes to the URL given to connect(), with these
 * query parameters added:
 *   gc_transport  "websocket" | "sse" | "longpoll"
 *   gc_cid        a random client id, the same for the whole life of the connect()
 *                 object (across reconnects and transports): it ties the POSTs
 *                 and the GETs of one logical session together.
 *   gc_last       the id of the last message received, when there is one (the SSE
 *                 event id, the Greenchan-Event-Id header of a long-poll
 *                 response, or whatever the page stored in `chan.lastEventId`):
 *                 a server that keeps a short history can send what was missed.
 *   gc_open=1     only on the first GET of each long-poll (re)connection.
 *
 * WebSocket   a plain WebSocket to the URL (http -> ws, https -> wss); text and
 *             binary messages both ways (binary arrives as an ArrayBuffer).
 * SSE         GET with `Accept: text/event-stream` (EventSource). The server
 *             answers with a stream of `Event`s: each unnamed event's data is one
 *             message, its `id` becomes gc_last. The server must start the stream
 *             at once (send any first Event, e.g. a named one such as
 *             Event("", event="greenchan-open"); named events are not delivered
 *             as messages), because the client waits for the response headers to
 *             call the transport open.
 * long-poll   GET; each response carries at most one message:
 *               200  body = one message (text, or an ArrayBuffer when the
 *                    Content-Type is application/octet-stream); an optional
 *                    `Greenchan-Event-Id` response header becomes gc_last;
 *               204  no message (the server's wait timed out, or the answer to
 *                    gc_open=1 with nothing pending); the client polls again.
 *             A request with gc_open=1 must be answered at once (a pending
 *             message or 204): it is how the client knows the server is there.
 *             Messages that arrive between two polls are the server's to keep
 *             (gc_last tells it where the client is).
 * client -> server over SSE and long-poll: one POST per message, one at a time
 *             in order, body = the message, Content-Type
 *             `text/plain;charset=UTF-8` for a string (the handler receives a
 *             str) or `application/octet-stream` for binary (bytes). Any 2xx
 *             means delivered. 4xx (except 408 and 429) drops the message with
 *             an `ondrop` event; a network error, 408, 429 or 5xx keeps it queued
 *             and reconnects, so a message may be delivered twice but is never
 *             lost silently.
 *
 * Over a WebSocket there are no acknowledgements: a message handed to an open
 * socket that dies just after is lost by the network, as with any WebSocket.
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

  var EVENTS = ["open", "message", "close", "reconnecting", "error", "drop"];

  function randomId() {
    var bytes = new Uint8Array(12);
    var c = root.crypto;
    if (c && c.getRandomValues) {
      c.getRandomValues(bytes);
    } else {
      for (var i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
    }
    return Array.prototype.map.call(bytes, function (b) {
      return (b < 16 ? "0" : "") + b.toString(16);
    }).join("");
  }

  function isBinary(data) {
    return (typeof ArrayBuffer !== "undefined" && (data instanceof ArrayBuffer || ArrayBuffer.isView(data))) ||
      (typeof Blob !== "undefined" && data instanceof Blob);
  }

  function available(name) {
    if (name === "websocket") return !!root.WebSocket;
    if (name === "sse") return !!root.EventSource && !!root.fetch;
    if (name === "longpoll") return !!root.fetch;
    return false;
  }

  // ---------------------------------------------------------------- transports
  // A driver opens one transport once. It reports `open()` at most once, then
  // `message(data, id)` any number of times, then `down(info)` exactly once
  // (whether it ever opened or not), unless the connection stops it first.

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
  Driver.prototype.markOpen = function () {
    if (this.done || this.opened) return;
    clearTimeout(this.timer);
    this.opened = true;
    this.conn._driverOpen(this);
  };
  Driver.prototype.deliver = function (data, id) {
    if (!this.done) this.conn._driverMessage(this, data, id);
  };
  Driver.prototype.fail = function (info) {
    if (this.done) return;
    this.stop();
    this.conn._driverDown(this, info || {});
  };
  Driver.prototype.stop = function () {
    this.done = true;
    clearTimeout(this.timer);
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
    this.ws.onopen = function () { self.markOpen(); };
    this.ws.onmessage = function (e) { self.deliver(e.data, ""); };
    this.ws.onclose = function (e) {
      self.fail({code: e.code, reason: e.reason || "websocket closed", wasClean: e.wasClean});
    };
  }
  WebSocketDriver.prototype = Object.create(Driver.prototype);
  WebSocketDriver.prototype.trySend = function (data) {
    if (!this.opened || this.done || !this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(data);
    return true;
  };
  WebSocketDriver.prototype.flush = function () {
    var q = this.conn._queue;
    while (q.length && this.trySend(q[0])) q.shift();
  };
  WebSocketDriver.prototype.close = function () {
    var ws = this.ws;
    this.ws = null;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try { ws.close(1000); } catch (err) { /* already closing */ }
  };

  // The HTTP fallbacks share the POST pump: one request at a time, in order.
  function HttpDriver(conn, name) {
    Driver.call(this, conn, name);
    this.posting = false;
    this.aborts = [];
  }
  HttpDriver.prototype = Object.create(Driver.prototype);
  HttpDriver.prototype.trySend = function () { return false; };
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
    var data = conn._queue[0];
    var binary = isBinary(data);
    this.posting = true;
    this.request(conn._url(this.name, {}), {
      method: "POST",
      body: data,
      headers: {"Content-Type": binary ? "application/octet-stream" : "text/plain;charset=UTF-8"}
    }, conn.options.postTimeout).then(function (resp) {
      self.posting = false;
      if (self.done) return;
      var s = resp.status;
      if (resp.ok || (s >= 400 && s < 500 && s !== 408 && s !== 429)) {
        if (conn._queue[0] === data) conn._queue.shift();
        if (!resp.ok) conn._drop(data, "rejected by the server: HTTP " + s);
        self.flush();
      } else {
        self.fail({code: s, reason: "POST answered HTTP " + s});
      }
    }, function (err) {
      self.posting = false;
      self.fail({reason: "POST failed: " + (err.timedOut ? "timed out" : err.message)});
    });
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
    this.es.onopen = function () { self.markOpen(); };
    this.es.onmessage = function (e) { self.deliver(e.data, e.lastEventId); };
    // EventSource would reconnect by itself, without backoff or our events: stop it.
    this.es.onerror = function () { self.fail({reason: "event stream ended"}); };
  }
  SseDriver.prototype = Object.create(HttpDriver.prototype);
  SseDriver.prototype.close = function () {
    HttpDriver.prototype.close.call(this);
    var es = this.es;
    this.es = null;
    if (!es) return;
    es.onopen = es.onmessage = es.onerror = null;
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
    var started = Date.now();
    var timeout = opening ? conn.options.connectTimeout : conn.options.pollTimeout;
    this.request(conn._url("longpoll", opening ? {gc_open: "1"} : {}), {
      method: "GET",
      headers: {"Accept": "application/json, text/plain, */*"}
    }, timeout).then(function (resp) {
      if (self.done) return;
      if (resp.status === 204) {
        self.markOpen();
        // A server that answers every poll at once would make us spin: pause a little.
        var quick = !opening && Date.now() - started < 1000;
        if (quick) self.timer = setTimeout(function () { self.poll(false); }, 1000);
        else self.poll(false);
        return;
      }
      if (!resp.ok) {
        self.fail({code: resp.status, reason: "poll answered HTTP " + resp.status});
        return;
      }
      var type = resp.headers.get("Content-Type") || "";
      var id = resp.headers.get("Greenchan-Event-Id") || "";
      var body = type.indexOf("application/octet-stream") === 0 ? resp.arrayBuffer() : resp.text();
      return body.then(function (data) {
        if (self.done) return;
        self.markOpen();
        self.deliver(data, id);
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
    this.lastEventId = opts.lastEventId || "";
    this.transport = null;  // "websocket" | "sse" | "longpoll" while open, else the last one
    this.state = "connecting";  // "connecting" | "open" | "reconnecting" | "closed"
    this.reconnectAttempt = 0;
    this._queue = [];
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

  /** Queues or sends `data` (a string or binary); false when it cannot be kept. */
  Connection.prototype.send = function (data) {
    if (this.state === "closed") {
      this._drop(data, "closed");
      return false;
    }
    var d = this._driver;
    if (d && d.opened && !this._queue.length && d.trySend(data)) return true;
    if (this._queue.length >= this.options.maxQueue) {
      this._drop(data, "queue full (" + this.options.maxQueue + " messages)");
      return false;
    }
    this._queue.push(data);
    if (d && d.opened) d.flush();
    return true;
  };

  /** Messages accepted by send() and not yet handed to the network. */
  Object.defineProperty(Connection.prototype, "queued", {get: function () { return this._queue.length; }});

  /** Closes for good; queued messages are reported through `ondrop`. */
  Connection.prototype.close = function () {
    if (this.state === "closed") return;
    this._finish({code: 1000, reason: "closed by the client", wasClean: true});
  };

  /** Skips the wait of a scheduled reconnect. */
  Connection.prototype.reconnectNow = function () {
    if (this.state === "reconnecting") this._cycle();
  };

  Connection.prototype._url = function (transport, extra) {
    var u = new URL(this.url.href);
    u.searchParams.set("gc_transport", transport);
    u.searchParams.set("gc_cid", this.clientId);
    if (this.lastEventId) u.searchParams.set("gc_last", this.lastEventId);
    Object.keys(extra).forEach(function (k) { u.searchParams.set(k, extra[k]); });
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

  Connection.prototype._driverOpen = function (driver) {
    if (driver !== this._driver) return;
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
  };

  Connection.prototype._driverMessage = function (driver, data, id) {
    if (driver !== this._driver) return;
    if (id) this.lastEventId = id;
    this._emit("message", {data: data, lastEventId: id || "", transport: driver.name});
  };

  Connection.prototype._driverDown = function (driver, info) {
    if (driver !== this._driver) return;
    this._driver = null;
    info.transport = driver.name;
    clearTimeout(this._stableTimer);
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
    this.state = "closed";
    clearTimeout(this._timer);
    clearTimeout(this._stableTimer);
    if (root.removeEventListener) root.removeEventListener("online", this._online);
    var d = this._driver;
    this._driver = null;
    if (d) d.stop();
    var left = this._queue.splice(0);
    for (var i = 0; i < left.length; i++) this._drop(left[i], "closed before it could be sent");
    this._emit("close", event);
  };

  root.greenchan = {
    version: "1",
    connect: function (url, options) { return new Connection(url, options); },
    Connection: Connection,
    defaults: DEFAULTS
  };
})(typeof window !== "undefined" ? window : this);
