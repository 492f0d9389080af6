"""A real headless Chromium (Debian's ``chromium``), driven over the DevTools protocol with aiohttp (which
Ray already brings): open a page, wait until a JavaScript condition holds, read the DOM, save a screenshot.

Chromium's one-shot ``--dump-dom`` / ``--screenshot`` cannot wait for a single-page app to fetch and draw
(the MLflow UI loads its charts lazily), hence the protocol: every check waits for what it asserts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

#: Debian's package name and binary
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One tab over a DevTools websocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        mid = next(self._ids)
        await self.ws.send_str(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        out = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    async def goto(self, url: str) -> None:
        """A fresh document at ``url``: a link that differs only after ``#`` would otherwise be a same-page
        navigation, which a single-page app may not follow."""
        await self.call("Page.navigate", url="about:blank")
        await self.call("Page.navigate", url=url)

    async def wait_for(self, expression: str, timeout_s: float = 60.0, interval_s: float = 0.5) -> Any:
        """Poll ``expression`` until it is truthy; its value, or TimeoutError naming it (and the last error,
        when it raised: a page still loading has no ``document.body`` yet)."""
        deadline = time.monotonic() + timeout_s
        last_error = None
        while True:
            try:
                value = await self.evaluate(expression)
            except RuntimeError as err:
                value, last_error = None, err
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"not true after {timeout_s:.0f} s: {expression} (last error: {last_error})"
                )
            await asyncio.sleep(interval_s)

    async def screenshot(self, path: str | os.PathLike) -> Path:
        data = await self.call("Page.captureScreenshot", format="png")
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data["data"]))
        return out


@contextlib.asynccontextmanager
async def chromium(width: int = 1400, height: int = 1000):
    """A headless Chromium on a loopback debugging port of its choosing, with a throwaway profile; yields
    a :class:`Page`."""
    import aiohttp

    if CHROMIUM is None:
        raise RuntimeError("no chromium on PATH (Debian: apt-get install chromium; `make test` installs it)")
    profile = tempfile.mkdtemp(prefix="bamray-chromium-")
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # root in a container has no user namespace for the sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json() if t["type"] == "page"]
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                await page.call(
                    "Emulation.setDeviceMetricsOverride",
                    width=width,
                    height=height,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                yield page
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
