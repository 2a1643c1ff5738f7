// What the Socket.IO check scripts share: failing checks, bounded waits, publishing.
"use strict";

const WAIT_MS = 15000;

/// Fails the run with a message (every check can fail; nothing is skipped).
function check(ok, what) {
  if (!ok) {
    console.error("FAILED: " + what);
    process.exit(1);
  }
}

/// `promise`, or a failure naming `what` after WAIT_MS.
function within(promise, what) {
  return Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error("timed out: " + what)), WAIT_MS)),
  ]);
}

/// Resolves once `cond()` holds (looked at every 5 ms), within WAIT_MS.
function until(cond, what) {
  return within(new Promise((resolve) => {
    const t = setInterval(() => { if (cond()) { clearInterval(t); resolve(); } }, 5);
  }), what);
}

/// POSTs `body` to `url`'s publish API with the API key; its seq.
async function publishTo(url, apiKey, body) {
  const res = await fetch(url + "/api/v1/publish", {
    method: "POST",
    headers: { authorization: "Bearer " + apiKey, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const json = await res.json();
  check(res.status === 200, "publish answered " + res.status + " " + JSON.stringify(json));
  return json.seq;
}

/// Each channel of `published` (channel -> seqs) was received exactly so in `got`: every
/// event once, in order.
function checkSame(got, published) {
  for (const channel of Object.keys(published)) {
    check(JSON.stringify(got[channel]) === JSON.stringify(published[channel]),
      channel + ": every event once, in order: got " + JSON.stringify(got[channel]) +
      " published " + JSON.stringify(published[channel]));
  }
}

/// Runs the script's `main`, exiting 0 when it resolves and 1 (with the error) when not.
function run(main) {
  main().then(
    () => process.exit(0),
    (e) => {
      console.error("FAILED: " + (e && e.stack ? e.stack : e));
      process.exit(1);
    }
  );
}

module.exports = { check, checkSame, within, until, publishTo, run };
