#!/usr/bin/env bash
# Real-browser check of examples/web_app.py: serve the bundled docs with the real default model on a free
# loopback port, open /?q=QUESTION in headless Chromium, wait until the streamed answer is complete, save the
# DOM and a screenshot, and fail unless the answer has coloured tokens from at least two draft sources and the
# stats block. Installs Debian's chromium when missing (needs root and apt).
#
#   scripts/check_web_page.sh                       # screenshot -> docs/web_app.png
#   QUESTION="What did Marie Curie discover?" SCREENSHOT=/tmp/page.png scripts/check_web_page.sh
#
# Chromium's --dump-dom returns as soon as the page has loaded, before a streamed answer is complete, so the
# browser is driven over its DevTools pipe (fds 3 and 4, through two FIFOs) by a few lines of stdlib Python.
set -euo pipefail
cd "$(dirname "$0")/.."

QUESTION=${QUESTION:-Who designed the Eiffel Tower?}
SCREENSHOT=${SCREENSHOT:-docs/web_app.png}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}  # two or three sentences: several n-gram copies, quick on a CPU
ANSWER_TIMEOUT_S=${ANSWER_TIMEOUT_S:-300}  # the default model makes ~10-20 tokens/s on a busy 2-core CPU
SERVER_TIMEOUT_S=${SERVER_TIMEOUT_S:-180}  # model load + first indexing of examples/docs
PY=${PYTHON:-.venv/bin/python}

fail() { echo "check_web_page: FAIL: $*" >&2; exit 1; }

if ! command -v chromium >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

work=$(mktemp -d)
server_pid=""
chrome_pid=""
cleanup() {
    [ -n "$chrome_pid" ] && kill "$chrome_pid" 2>/dev/null
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# 1. The server, on a port the OS picks; it prints its URL once the index and the model are ready.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" examples/web_app.py examples/docs --port 0 \
    --max-new-tokens "$MAX_NEW_TOKENS" >"$work/server.log" 2>&1 &
server_pid=$!
url=""
for _ in $(seq "$SERVER_TIMEOUT_S"); do
    url=$(grep -o 'http://127\.0\.0\.1:[0-9]*/' "$work/server.log" | head -n 1) && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; fail "the server exited"; }
    sleep 1
done
[ -n "$url" ] || { cat "$work/server.log" >&2; fail "no server URL after ${SERVER_TIMEOUT_S}s"; }
page="${url}?q=$("$PY" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$QUESTION")"
echo "check_web_page: opening $page"

# 2. Headless Chromium (flags for a closed network: no background connections), DevTools on fds 3 and 4.
mkfifo "$work/to_chrome" "$work/from_chrome"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$work/profile" --remote-debugging-pipe \
    about:blank 3<"$work/to_chrome" 4>"$work/from_chrome" 2>"$work/chrome.log" &
chrome_pid=$!

# 3. Load the page, wait for body[data-state] to leave "streaming", save the DOM and a full-page screenshot.
timeout "$((ANSWER_TIMEOUT_S + SERVER_TIMEOUT_S))" "$PY" - "$work/to_chrome" "$work/from_chrome" "$page" "$work/dom.html" "$SCREENSHOT" "$ANSWER_TIMEOUT_S" <<'PY'
import base64, json, os, sys, time

to_chrome, from_chrome, page, dom_path, png_path, timeout_s = sys.argv[1:]
WIDTH, HEIGHT = 1000, 900  # viewport in CSS pixels; the screenshot covers the whole page height
POLL_S = 0.5
commands = open(to_chrome, "wb", buffering=0)  # same open order as the shell's redirections: no deadlock
replies = os.open(from_chrome, os.O_RDONLY)
pending = b""
last_id = 0


def receive() -> dict:
    global pending
    while b"\0" not in pending:  # messages are JSON, each terminated by a NUL byte
        chunk = os.read(replies, 1 << 16)
        if not chunk:
            sys.exit("check_web_page: Chromium closed the DevTools pipe (see its log)")
        pending += chunk
    message, pending = pending.split(b"\0", 1)
    return json.loads(message)


def send(method: str, session: str | None = None, **params) -> dict:
    global last_id
    last_id += 1
    message = {"id": last_id, "method": method, "params": params}
    if session:
        message["sessionId"] = session
    commands.write(json.dumps(message).encode() + b"\0")
    while (reply := receive()).get("id") != last_id:
        pass  # an event, not our reply
    if "error" in reply:
        sys.exit(f"check_web_page: {method} failed: {reply['error']}")
    return reply["result"]


def evaluate(session: str, expression: str):
    return send("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")


target = send("Target.createTarget", url="about:blank")["targetId"]
session = send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
send("Emulation.setDeviceMetricsOverride", session, width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
send("Page.navigate", session, url=page)
deadline = time.monotonic() + float(timeout_s)
state = None
while time.monotonic() < deadline:
    state = evaluate(session, "document.body && document.body.dataset.state")
    if state in ("done", "error"):
        break
    time.sleep(POLL_S)
status = evaluate(session, "document.getElementById('status')?.textContent")
print(f"check_web_page: page state {state!r}, status line {status!r}")
with open(dom_path, "w", encoding="utf-8") as out:
    out.write(evaluate(session, "document.documentElement.outerHTML"))
size = send("Page.getLayoutMetrics", session)["cssContentSize"]
clip = {"x": 0, "y": 0, "width": WIDTH, "height": size["height"], "scale": 1}
shot = send("Page.captureScreenshot", session, format="png", clip=clip, captureBeyondViewport=True)
with open(png_path, "wb") as out:
    out.write(base64.b64decode(shot["data"]))
send("Browser.close")
PY
wait "$chrome_pid" 2>/dev/null || true
chrome_pid=""
echo "check_web_page: screenshot $SCREENSHOT"

# 4. Assertions on the rendered DOM.
dom="$work/dom.html"
grep -q '<body data-state="done">' "$dom" || fail "the answer did not complete (see the screenshot)"
sources=$(grep -o 'class="tok src-[a-z]*" data-source="[^"]*"' "$dom" | sed 's/.*data-source="//; s/"$//' | sort -u)
echo "check_web_page: token sources on the page: $(printf '%s ' $sources)"
[ "$(printf '%s\n' "$sources" | grep -c .)" -ge 2 ] || fail "coloured tokens from fewer than two sources"
grep -q '<section id="stats">' "$dom" || fail "the stats block is not shown"
for text in 'τ' 'tokens/s' 'Accepted drafts by source' 'prefill' 'verify' 'Retrieved sources'; do
    grep -q "$text" "$dom" || fail "the stats block lacks '$text'"
done
echo "check_web_page: OK"
