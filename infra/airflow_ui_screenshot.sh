#!/usr/bin/env bash
# Screenshot of the Airflow UI as `make airflow` serves it: the synergen_daily DAG with its runs (grid view).
#
# Usage:
#   infra/airflow_ui_screenshot.sh [AIRFLOW_HOME] [OUTPUT.png]
#     AIRFLOW_HOME  default: $REPO/var/airflow (the Airflow home of `make run`; run that first)
#     OUTPUT.png    default: $REPO/benchmarks/results/airflow_ui.png
#   Environment:
#     PAGE=/dags/synergen_daily/runs   UI path to open (e.g. /dags/synergen_daily, or .../runs/<run_id>)
#     WIDTH=1600 HEIGHT=1000           window size in CSS pixels
#     SCHEDULE=0                       1: let the scheduler create scheduled runs while the UI is up
#     SYNERGEN_CONFIG                  default: the config `synergen run` wrote next to AIRFLOW_HOME
#
# What it does:
#   1. Starts `airflow standalone` with the environment of the Makefile's `airflow` target (AIRFLOW_ENV:
#      API bound to 127.0.0.1, this repo's dags folder, examples off, DAGs unpaused at creation,
#      parallelism 4, SYNERGEN_CONFIG, the venv on PATH) and the same three steps before it (db migrate,
#      dags reserialize, dags unpause synergen_daily). Two differences: the API port is a free one instead
#      of 8080 (so it never collides with a UI already running), and, unless SCHEDULE=1, the scheduler does
#      not create scheduled runs ([scheduler] use_job_schedule=False): the DAG is unpaused with
#      schedule @daily and catchup off, so the scheduler would otherwise start a new run of the whole
#      pipeline at once, and the picture would show a run half done. Existing runs are shown as they are.
#   2. Waits until the API answers (/api/v2/monitor/health), then logs in as the UI does with the
#      SimpleAuthManager: POST /auth/token with user admin and the password that standalone generated in
#      $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated; the token goes into the `_token`
#      cookie, which is what the login page sets.
#   3. Opens $PAGE in headless Chromium (Debian's /usr/bin/chromium: `apt-get install -y chromium`)
#      with infra/ui_screenshot.py, which waits for the page to render and saves a PNG.
#   4. Stops standalone with SIGINT to its PID (what Ctrl-C does; SIGTERM leaves orphaned workers), waits
#      for it to exit, then kills what is left of its process group (and only that).
#
# Runs as root (Chromium gets --no-sandbox). Takes about 1-2 minutes, most of it standalone starting.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$REPO/.venv/bin"
AIRFLOW_HOME="$(realpath -m "${1:-$REPO/var/airflow}")"
OUT="$(realpath -m "${2:-$REPO/benchmarks/results/airflow_ui.png}")"
PAGE="${PAGE:-/dags/synergen_daily/runs}"
WIDTH="${WIDTH:-1600}"
HEIGHT="${HEIGHT:-1000}"
SCHEDULE="${SCHEDULE:-0}"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"  # read by infra/ui_screenshot.py too

[[ -x "$BIN/airflow" ]] || { echo "no $BIN/airflow: run 'make setup' (or 'make run') first" >&2; exit 1; }
[[ -x "$CHROMIUM" ]] || { echo "no $CHROMIUM: apt-get install -y chromium" >&2; exit 1; }
[[ -f "$AIRFLOW_HOME/airflow.db" ]] || echo "warning: no $AIRFLOW_HOME/airflow.db: the DAG will have no runs (run 'make run' first)" >&2

PORT="$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"
WORK="$(mktemp -d /tmp/airflow-ui-shot.XXXXXX)"
LOG="$WORK/standalone.log"

# The Makefile's AIRFLOW_ENV, with AIRFLOW_HOME, the port and SYNERGEN_CONFIG taken from above.
export AIRFLOW_HOME
export AIRFLOW__CORE__DAGS_FOLDER="$REPO/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__CORE__PARALLELISM=4
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT="$PORT"
export SYNERGEN_CONFIG="${SYNERGEN_CONFIG:-$(dirname "$AIRFLOW_HOME")/synergen-run.yaml}"
export PATH="$BIN:$PATH"
# Not in the Makefile: the API's base URL on the free port (task supervisors reach the execution API by
# it), and no scheduled runs while the picture is taken (see above).
export AIRFLOW__API__BASE_URL="$URL"
[[ "$SCHEDULE" == 1 ]] || export AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE=False

SA_PID=""
stop() {
    local rc=$?
    if [[ -n "$SA_PID" ]] && kill -0 "$SA_PID" 2>/dev/null; then
        echo "stopping airflow standalone (SIGINT to $SA_PID)" >&2
        kill -INT "$SA_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$SA_PID" 2>/dev/null || break; sleep 1; done
        kill -0 "$SA_PID" 2>/dev/null && kill -KILL "$SA_PID" 2>/dev/null || true
        wait "$SA_PID" 2>/dev/null || true
    fi
    if [[ -n "$SA_PID" ]]; then  # leftovers of standalone's own process group only
        kill -TERM -- "-$SA_PID" 2>/dev/null && sleep 3 || true
        kill -KILL -- "-$SA_PID" 2>/dev/null || true
    fi
    [[ $rc -eq 0 ]] || echo "failed; standalone's log: $LOG" >&2
    [[ $rc -ne 0 ]] || rm -rf "$WORK"
    exit $rc
}
trap stop EXIT
trap 'exit 130' INT TERM

cd "$REPO"
echo "AIRFLOW_HOME=$AIRFLOW_HOME, UI on $URL" >&2
airflow db migrate > /dev/null
airflow dags reserialize > /dev/null 2>&1 || true
airflow dags unpause synergen_daily > /dev/null 2>&1 || true

# Job control: the background job gets its own process group (PGID = its PID) and, unlike a background
# job of a non-interactive shell, does not ignore SIGINT.
set -m
airflow standalone > "$LOG" 2>&1 &
SA_PID=$!
set +m

echo "waiting for the API ($LOG)" >&2
for i in $(seq 240); do
    curl -fsS -o /dev/null "$URL/api/v2/monitor/health" 2>/dev/null && break
    kill -0 "$SA_PID" 2>/dev/null || { echo "airflow standalone exited:" >&2; tail -30 "$LOG" >&2; exit 1; }
    [[ $i -lt 240 ]] || { echo "the API did not answer in 240 s" >&2; exit 1; }
    sleep 1
done

PASSWORDS="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
for _ in $(seq 30); do [[ -s "$PASSWORDS" ]] && break; sleep 1; done
TOKEN="$("$BIN/python" - "$PASSWORDS" "$URL" <<'PY'
import json, sys, urllib.request
users = json.load(open(sys.argv[1]))
user = "admin" if "admin" in users else next(iter(users))
req = urllib.request.Request(f"{sys.argv[2]}/auth/token", method="POST",
                             data=json.dumps({"username": user, "password": users[user]}).encode(),
                             headers={"Content-Type": "application/json"})
print(json.load(urllib.request.urlopen(req))["access_token"])
PY
)"

# The DAG must be parsed and serialized before its page shows it (the dag processor does that at start).
for i in $(seq 120); do
    curl -fsS -o /dev/null -H "Authorization: Bearer $TOKEN" "$URL/api/v2/dags/synergen_daily" 2>/dev/null && break
    [[ $i -lt 120 ]] || { echo "DAG synergen_daily not known to the API after 120 s" >&2; exit 1; }
    sleep 1
done

# Chromium, the login cookie, waiting for the page to render and the PNG: infra/ui_screenshot.py (it
# stops its Chromium by PID), as the loopback production test takes its pictures.
"$BIN/python" "$REPO/infra/ui_screenshot.py" "$URL$PAGE" "$OUT" --cookie "_token=$TOKEN" \
    --wait-text synergen_daily --width "$WIDTH" --height "$HEIGHT"
echo "saved $OUT" >&2
