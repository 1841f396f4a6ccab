"""Load a page in headless Chromium over the DevTools protocol and collect what went wrong."""

from __future__ import annotations

import asyncio
from typing import Any


async def _check(url: str, expression: str, settle_s: float) -> tuple[list[str], Any]:
    import choreographer

    problems: list[str] = []
    async with choreographer.Browser(headless=True) as browser:
        tab = await browser.create_tab("")

        async def on_console(message: dict) -> None:
            params = message["params"]
            if params["type"] in ("error", "assert", "warning"):
                text = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                problems.append(f"console.{params['type']}: {text}")

        async def on_exception(message: dict) -> None:
            details = message["params"]["exceptionDetails"]
            problems.append("uncaught: " + details.get("exception", {}).get("description", details.get("text", "")))

        async def on_log(message: dict) -> None:
            entry = message["params"]["entry"]
            if entry["level"] in ("error", "warning"):
                problems.append(f"{entry['level']}: {entry['text']} {entry.get('url', '')}")

        tab.subscribe("Runtime.consoleAPICalled", on_console)
        tab.subscribe("Runtime.exceptionThrown", on_exception)
        tab.subscribe("Log.entryAdded", on_log)
        for domain in ("Runtime", "Log", "Page"):
            await tab.send_command(f"{domain}.enable")
        loaded = tab.subscribe_once("Page.loadEventFired")
        await tab.send_command("Page.navigate", params={"url": url})
        await asyncio.wait_for(loaded, timeout=60)
        await asyncio.sleep(settle_s)
        result = await tab.send_command("Runtime.evaluate", params={"expression": expression, "returnByValue": True})
    return problems, result["result"]["result"].get("value")


def load_page(url: str, expression: str = "1", settle_s: float = 1.0) -> tuple[list[str], Any]:
    """Console errors/warnings, uncaught exceptions and failed loads of `url`, and the value of
    `expression` evaluated in the page once it has loaded and settled."""
    return asyncio.run(_check(url, expression, settle_s))
