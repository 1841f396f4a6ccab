"""Reading a JSON object from a file another run or tool wrote, with one clear error when it is not one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flipscope.errors import FlipscopeError, first_line

__all__ = ["read_json_object"]


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`.

    Raises:
        FlipscopeError: the file cannot be read, is not UTF-8 JSON, or holds another JSON type;
            the message names the file and `what` it should hold (e.g. "SAE config").
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise FlipscopeError(f"{str(path)!r} is not a JSON {what} ({first_line(err)})") from err
    if not isinstance(data, dict):
        raise FlipscopeError(f"{str(path)!r} is a JSON {type(data).__name__}; expected an object (a {what})")
    return data
