// Socket.IO v4 peer for the ringcast benchmarks: the stack the seeds were written for
// (NestJS gateways run on exactly this server), in one Node process, as they would deploy it.
//
// Subscribe: ws://127.0.0.1:PORT/socket.io/?EIO=4&transport=websocket&channel=NAME
//            (the socket joins the room NAME on connection)
// Publish:   POST /publish/NAME with a JSON body -> io.to(NAME).emit("event", body)
//            answers 200 {"ok":true} once the frames are handed to the sockets.
// See ../README.md for the wire format the load generator speaks.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

const PORT = Number(process.env.PORT || 8092);
const HOST = "127.0.0.1";
const PUBLISH = /^\/publish\/([^/?]+)/;

let io;

function reply(res, status, body) {
  res.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(body),
  });
  res.end(body);
}

// Requests that are not Socket.IO's (engine.io passes them on to this listener).
const server = http.createServer((req, res) => {
  const m = req.method === "POST" && PUBLISH.exec(req.url);
  if (!m) {
    if (req.method === "GET" && req.url === "/") return reply(res, 200, '{"ok":true}');
    return reply(res, 404, '{"error":"not found"}');
  }
  const channel = decodeURIComponent(m[1]);
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    let payload;
    try {
      payload = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch (e) {
      return reply(res, 400, '{"error":"invalid JSON"}');
    }
    io.to(channel).emit("event", payload);
    reply(res, 200, '{"ok":true}');
  });
});

// A publisher keeps one connection for the whole run (Node's default closes it after 5 s idle).
server.keepAliveTimeout = 600_000;
server.headersTimeout = 601_000;

io = new Server(server, {
  transports: ["websocket"],
  perMessageDeflate: false,
  // Defaults kept on purpose: pingInterval 25 s, pingTimeout 20 s, connectTimeout 45 s.
  // SIO_RECOVERY=1 turns on Socket.IO's own replay (off by default, as most deployments run):
  // events then carry an offset and a reconnecting client sends it back (see ../README.md).
  connectionStateRecovery: process.env.SIO_RECOVERY === "1"
    ? { maxDisconnectionDuration: 2 * 60 * 1000, skipMiddlewares: true }
    : undefined,
});

io.on("connection", (socket) => {
  if (socket.recovered) return; // rooms restored with the session
  const channel = socket.handshake.query.channel;
  if (typeof channel === "string" && channel.length > 0) socket.join(channel);
});

server.listen(PORT, HOST, 4096, () => {
  console.log(`listening on ${HOST}:${server.address().port}`);
});
