"""Headless Chromium for the page tests, driven over W3C WebDriver (Debian's ``chromium-driver``).

The client is these few calls over HTTP with httpx (already a test dependency): a session, navigate,
run a script, click, type, screenshot, and the browser's console log (chromedriver's
``goog:loggingPrefs``: console messages, uncaught exceptions, failed loads and CSP violations).
A driver library would add a dependency and its own release cycle for nothing more; Selenium's
current wheel did not even install here (it pins a ``certifi`` newer than the index had).

Chromium runs with the flags this closed network needs (no background networking, no component
updates, no sync, no QUIC) and a fresh profile per browser.
"""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1"]


def find_browser() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or why there are none."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver)) if not p)
    return (f"no headless browser: {missing} not found on PATH; `make test` installs Debian's chromium and "
            "chromium-driver with apt-get when it runs as root (apt-get install -y chromium chromium-driver)")


class Browser:
    """One Chromium window (``width`` × ``height``) behind one chromedriver process."""

    def __init__(self, chromium: str, driver: str, artifacts: Path, width: int = 1440, height: int = 900) -> None:
        self.artifacts = artifacts
        self.log: list[dict[str, Any]] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._driver = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self._profile = tempfile.mkdtemp(prefix="lorakit-chromium-")
        self._http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self._driver.poll() is not None:
                raise RuntimeError(f"chromedriver did not start on port {port}")
            time.sleep(0.05)
        args = [*FLAGS, f"--window-size={width},{height}", f"--user-data-dir={self._profile}"]
        capabilities = {"browserName": "chrome", "goog:chromeOptions": {"binary": chromium, "args": args},
                        "goog:loggingPrefs": {"browser": "ALL"}}
        value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}}, session=False)
        self._session = f"/session/{value['sessionId']}"

    def _call(self, method: str, path: str, body: dict | None = None, session: bool = True) -> Any:
        url = (self._session if session else "") + path
        response = self._http.request(method, url, json=body if body is not None else ({} if method == "POST" else None))
        value = response.json().get("value")
        if response.status_code != 200:
            raise RuntimeError(f"WebDriver {method} {path}: {value}")
        return value

    # -- pages and scripts ------------------------------------------------------------------------

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body; ``arguments`` are ``args``) and return its value."""
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, script: str, *args: Any, timeout: float = 60, what: str = "") -> Any:
        """Poll ``script`` until it returns something truthy; that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what or script}")
            time.sleep(0.05)

    def text(self, css: str) -> str:
        return self.js("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)

    # -- input ------------------------------------------------------------------------------------

    def element(self, css: str) -> str:
        found = self._call("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(found.values()))

    def click(self, css: str) -> None:
        self._call("POST", f"/element/{self.element(css)}/click")

    def type(self, css: str, text: str) -> None:
        element = self.element(css)
        self._call("POST", f"/element/{element}/clear")
        self._call("POST", f"/element/{element}/value", {"text": text})

    def upload(self, css: str, path: Path) -> None:
        """Choose ``path`` in a file input (what a user does in the file dialog)."""
        self._call("POST", f"/element/{self.element(css)}/value", {"text": str(path)})

    # -- what the user sees -----------------------------------------------------------------------

    def screenshot(self, name: str, full: bool = False) -> Path:
        """Save the window (``full``: the whole page, however long) as ``<artifacts>/<name>.png``."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{name}.png"
        rect = self._call("GET", "/window/rect")
        if full:
            height = self.js("return document.documentElement.scrollHeight")
            self._call("POST", "/window/rect", {"width": rect["width"], "height": max(rect["height"], height + 150)})
        try:
            path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        finally:
            if full:
                self._call("POST", "/window/rect", {"width": rect["width"], "height": rect["height"]})
        return path

    def console(self) -> list[dict[str, Any]]:
        """Every console entry so far (messages, exceptions, failed loads, CSP violations)."""
        self.log += self._call("POST", "/se/log", {"type": "browser"})
        return self.log

    def errors(self) -> list[str]:
        """The console's errors so far, as text."""
        return [e["message"] for e in self.console() if e["level"] == "SEVERE"]

    def close(self) -> None:
        try:
            self._call("DELETE", "")
        finally:
            self._http.close()
            self._driver.terminate()
            self._driver.wait(timeout=30)
            shutil.rmtree(self._profile, ignore_errors=True)
