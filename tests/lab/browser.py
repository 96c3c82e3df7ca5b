"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``): no driver package,
no port, no network. Enough to load a page at a given width and ask what a reader would see."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

EXECUTABLES = ("chromium", "chromium-browser", "google-chrome")


def executable() -> str | None:
    return next((p for p in map(shutil.which, EXECUTABLES) if p), None)


class Browser:
    """One Chromium process; ``open(url, width)`` gives a :class:`Tab`. Use as a context manager."""

    def __init__(self, exe: str | None = None, timeout: float = 30.0):
        exe = exe or executable()
        if exe is None:
            raise FileNotFoundError(f"none of {EXECUTABLES} is installed")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="bnlab-chromium-")
        to_child, from_us = os.pipe()  # the browser reads commands on its fd 3
        to_us, from_child = os.pipe()  # and writes answers on its fd 4

        def fds():
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
             "--hide-scrollbars", f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._w, self._r = from_us, to_us
        self._id, self._buf, self.events = 0, b"", []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _message(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            if not select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: str | None = None, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            answer = self._message()
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait(self, method: str, session: str) -> dict:
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method and e.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._message())

    def open(self, path: Path, width: int, height: int = 900) -> Tab:
        """A new tab ``width`` CSS pixels wide (a phone's when narrow), ``path`` loaded, its requests recorded."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.send(f"{domain}.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1, mobile=width < 600)
        self.send("Page.navigate", session, url=Path(path).resolve().as_uri())
        self.wait("Page.loadEventFired", session)
        return Tab(self, target, session)

    def close(self):
        try:
            self.send("Browser.close")
            self.proc.wait(10)
        except Exception:  # noqa: BLE001 - a browser that will not close politely is killed
            self.proc.kill()
            self.proc.wait(10)
        finally:
            os.close(self._w)
            os.close(self._r)
            shutil.rmtree(self.profile, ignore_errors=True)


class Tab:
    def __init__(self, browser: Browser, target: str, session: str):
        self.browser, self.target, self.session = browser, target, session

    def eval(self, expression: str):
        """The JSON value of a JavaScript expression evaluated in the page."""
        res = self.browser.send("Runtime.evaluate", self.session, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(res["exceptionDetails"].get("exception", {}).get("description", res["exceptionDetails"]))
        return res["result"].get("value")

    def requests(self) -> list[str]:
        """Every URL the page asked for (the page itself included)."""
        return [e["params"]["request"]["url"] for e in self.browser.events
                if e.get("sessionId") == self.session and e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path) -> None:
        """The whole page, as tall as it is, as PNG."""
        size = self.browser.send("Page.getLayoutMetrics", self.session)["cssContentSize"]
        data = self.browser.send("Page.captureScreenshot", self.session, format="png", captureBeyondViewport=True,
                                 clip={"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 20000), "scale": 1})
        Path(path).write_bytes(base64.b64decode(data["data"]))

    def close(self):
        self.browser.send("Target.closeTarget", targetId=self.target)
