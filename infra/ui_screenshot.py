"""A PNG of a web page as headless Chromium renders it (Debian's ``chromium`` package), for the UIs of a
running setup: the Airflow UI (logged in with a token from ``POST /auth/token``) and the MLflow UI.

    python infra/ui_screenshot.py URL OUT.png [--cookie _token=JWT] [--wait-text TEXT] [--width 1600]
                                              [--height 1000] [--click TEXT ...]

Chromium is started with a private profile and a DevTools port of its own, driven over the DevTools
protocol (the venv's ``websockets``): set the cookie, open the page, wait until it names ``--wait-text``,
shows no spinner and its text has not changed for 3 s, click every element whose text is ``--click`` (e.g.
an expander), wait again, save the PNG; Chromium is then stopped by its PID (its process group).
``infra/airflow_ui_screenshot.sh`` does the same for the UI of ``make airflow``; tests/test_production.py
calls this for the loopback production setup. Runs as root (``--no-sandbox``).
"""
from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def available() -> bool:
    return Path(CHROMIUM).exists() or shutil.which("chromium") is not None


def screenshot(url: str, out: Path, cookies: dict[str, str] | None = None, wait_text: str | None = None,
               width: int = 1600, height: int = 1000, click: list[str] | tuple[str, ...] = (),
               settle_s: float = 90) -> str:
    """Save ``url`` as a PNG in ``out``; return the page's text."""
    from websockets.sync.client import connect

    work = Path(tempfile.mkdtemp(prefix="synergen-shot-"))
    binary = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             "--hide-scrollbars", f"--user-data-dir={work / 'profile'}", "--remote-debugging-port=0",
                             f"--window-size={width},{height}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = work / "profile" / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and len(port_file.read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        port = port_file.read_text().splitlines()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        ids = itertools.count(1)
        with connect(ws_url, max_size=None, open_timeout=30) as ws:
            def call(method, **params):
                i = next(ids)
                ws.send(json.dumps({"id": i, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=120))
                    if msg.get("id") == i:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg.get("result", {})

            def evaluate(expr):
                return call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

            def settle() -> str:
                deadline, last, since = time.time() + settle_s, None, time.time()
                while time.time() < deadline:
                    time.sleep(1)
                    text = evaluate("document.body ? document.body.innerText : ''") or ""
                    busy = evaluate("document.querySelectorAll('.chakra-spinner, [aria-busy=true], "
                                    ".du-bois-light-spinner, [data-testid=spinner]').length") or 0
                    if text != last or busy or (wait_text and wait_text not in text):
                        last, since = text, time.time()
                    elif time.time() - since >= 3:
                        return text
                print(f"warning: {url} did not settle in {settle_s:.0f} s; saving what is shown", file=sys.stderr)
                return last or ""

            origin = "{0.scheme}://{0.netloc}/".format(urlsplit(url))
            call("Network.enable")
            for name, value in (cookies or {}).items():
                call("Network.setCookie", name=name, value=value, url=origin, path="/")
            call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            call("Page.enable")
            call("Page.navigate", url=url)
            text = settle()
            for label in click:
                evaluate(f"""(() => {{ for (const e of document.querySelectorAll('button, a, [role=button], span')) {{
                    if (e.innerText && e.innerText.trim() === {json.dumps(label)}) {{ e.click(); }} }} }})()""")
                text = settle()
            png = base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png)
        return text
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("out", type=Path)
    ap.add_argument("--cookie", action="append", default=[], help="NAME=VALUE, e.g. _token=<JWT> for Airflow")
    ap.add_argument("--wait-text")
    ap.add_argument("--click", action="append", default=[])
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1000)
    a = ap.parse_args(argv)
    text = screenshot(a.url, a.out, dict(c.split("=", 1) for c in a.cookie), a.wait_text, a.width, a.height, a.click)
    print(f"{a.out}: {a.out.stat().st_size} bytes; page text: {' | '.join(text.splitlines()[:40])}", file=sys.stderr)


if __name__ == "__main__":
    main()
