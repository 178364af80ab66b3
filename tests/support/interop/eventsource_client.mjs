// A real EventSource (the npm `eventsource` package, WHATWG semantics) reading
// one stream, driven by tests/e2e/test_interop.py.
//
//   node eventsource_client.mjs URL
//
// Prints one JSON object per line on stdout:
//   {"type":"open"}                              a connection was established
//   {"type":"message","id":..,"data":..}         an event (lastEventId, data)
//   {"type":"error","message":..}                the stream failed; EventSource
//                                                reconnects by itself, sending
//                                                Last-Event-ID
// and exits when its stdin closes (the test's way to stop it), or with status 3
// after a minute so a broken test can never leave it running.
import { EventSource } from "eventsource";

const url = process.argv[2];
if (!url) {
  console.error("usage: node eventsource_client.mjs URL");
  process.exit(2);
}

const emit = (record) => process.stdout.write(JSON.stringify(record) + "\n");

const source = new EventSource(url);
source.onopen = () => emit({ type: "open" });
source.onmessage = (event) =>
  emit({ type: "message", id: event.lastEventId, data: event.data });
source.onerror = (event) =>
  emit({ type: "error", message: String(event.message ?? ""), readyState: source.readyState });

const stop = (status) => {
  source.close();
  process.exit(status);
};
process.stdin.on("end", () => stop(0));
process.stdin.on("close", () => stop(0));
process.stdin.resume();
setTimeout(() => {
  console.error("eventsource_client: still running after 60 s, giving up");
  stop(3);
}, 60_000).unref();
