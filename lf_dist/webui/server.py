"""`lf-dist webui` and `lf-dist webchat`: the page on 127.0.0.1 unless another host is asked for.

Host: `--host`, else GRADIO_SERVER_NAME (LlamaBoard's variable), else 127.0.0.1 (this machine only); any other
host gets a warning line, since the page launches training and reads and writes files as its user. Port:
`--port`, else GRADIO_SERVER_PORT, else 7860 (LlamaBoard's). There are no share links.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lf_dist.errors import UserError
from lf_dist.log import get_logger

logger = get_logger(__name__)


def _address(host: str | None, port: int | None) -> tuple[str, int]:
    host = host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    if port is None:
        value = os.environ.get("GRADIO_SERVER_PORT", "7860")
        if not value.isdigit():
            raise UserError(f"GRADIO_SERVER_PORT: expected a TCP port, got {value!r}")
        port = int(value)
    if not 1 <= port <= 65535:
        raise UserError(f"--port: expected a TCP port from 1 to 65535, got {port}")
    return host, port


def _serve(app, host: str, port: int, what: str) -> int:
    import uvicorn

    from lf_dist.serve.api import _is_loopback

    logger.info(f"{what} on http://{host}:{port}/ (Ctrl-C to stop; training runs it started go on)")
    if not _is_loopback(host):
        logger.info(
            f"warning: host {host} is not loopback: anyone who reaches this machine can use the page, which starts "
            "training and reads and writes files as you"
        )
    guard_hosts(app, host)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0


def guard_hosts(app, host: str) -> None:
    """On loopback, answer only requests addressed to this machine's own names: a web page elsewhere cannot then
    reach the server through a name of its own that resolves here (DNS rebinding)."""
    from lf_dist.serve.api import _is_loopback

    if _is_loopback(host):
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "::1", "[::1]"])


def _check_installed(command: str) -> None:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"lf-dist {command} needs {' and '.join(missing)} (pip install 'lf-dist[webui]')")


def run_webui(root: str, host: str | None = None, port: int | None = None) -> int:
    _check_installed("webui")
    from lf_dist.webui.app import create_webui_app

    folder = Path(root).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--runs: {folder} is a file, not a folder")
    host, port = _address(host, port)
    return _serve(create_webui_app(folder.resolve()), host, port, f"lf-dist webui (runs under {folder})")


def run_webchat(cfg, host: str | None = None, port: int | None = None) -> int:
    _check_installed("webchat")
    from lf_dist.webui.app import ChatSlot, create_webui_app

    host, port = _address(host, port)
    slot = ChatSlot()
    name = slot.load(cfg)
    return _serve(create_webui_app(Path.cwd(), mode="webchat", chat=slot), host, port, f"lf-dist webchat ({name})")
