"""The web UI's server: one page (static/) and the JSON routes it calls, on the API's own stack (FastAPI).

Train: /api/config/load, /api/config/yaml, /api/datasets, /api/preview, /api/plan, /api/launch. Runs: /api/runs,
/api/run (state, the log records a page lacks, the last output lines), /api/run/stop, /api/run/resume. Chat:
/api/chat/load, then `lf-dist api`'s own app under /chat (/chat/v1/chat/completions, streamed). Export:
/api/export. A user's mistake — a bad value, a path that is not there, a plan that does not fit — is a 400 with
one line, `{"error": ...}`, and nothing written.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations as objects

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from pydantic import BaseModel

from lf_dist.errors import UserError
from lf_dist.log import get_logger
from lf_dist.train.checkpoint import list_checkpoints
from lf_dist.webui import forms, runs
from lf_dist.webui.run_state import log_lines, yaml_path
from lf_dist.webui.tail import records_after

logger = get_logger(__name__)
STATIC = Path(__file__).parent / "static"


class FormBody(BaseModel):
    form: dict


class RunBody(BaseModel):
    output_dir: str


class PathBody(BaseModel):
    path: str


class ChatSlot:
    """The chat model of the page: `lf-dist api`'s app over one ChatEngine, replaced when another is loaded."""

    def __init__(self):
        self.app, self.name, self.sampling = None, None, {}
        self.loading = threading.Lock()  # one model at a time: a second Load waits for the first

    def load(self, cfg) -> str:
        from lf_dist.serve.api import create_app
        from lf_dist.serve.engine import ChatEngine

        with self.loading:
            self.app = self.name = None  # the old model goes before the new one loads
            name = Path(cfg.model.adapter_name_or_path or cfg.model.model_name_or_path).name
            self.app, self.name = create_app(ChatEngine(cfg), name, api_key=None), name
            self.sampling = _sampling(cfg)
            return name

    async def __call__(self, scope, receive, send):
        if self.app is not None:
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": "no model is loaded: load one on the Chat page first"}}).encode()
        await send({"type": "http.response.start", "status": 409, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def _output_dir(form: dict) -> Path:
    value = form.get("output_dir")
    if not isinstance(value, str) or not value.strip():
        raise UserError("output_dir: give the folder the run writes to")
    out = Path(value).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} is a file, not a folder")
    return out.resolve()


def launch(form: dict) -> dict:
    """Check the form, plan it, refuse a plan that does not fit; then write the YAML beside the run and start it."""
    from lf_dist.webui.planning import launch_env, plan_form

    out = _output_dir(form)
    planned = plan_form(form)
    if not planned["fits"]:
        raise UserError(f"the plan does not fit: {planned['plan'].get('suggestion') or planned['lines'][0]}")
    return runs.launch(out, forms.to_yaml(form), launch_env(forms.ranks_of(form)))


def export(form: dict) -> dict:
    """`lf-dist export` of the form, in a process of its own (the merged model's memory goes with it)."""
    forms.checked(form, "export")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "export.yaml"
        config.write_text(forms.to_yaml(form), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "lf_dist", "export", str(config)],
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            env={**os.environ, "PYTHONUTF8": "1"},
        )
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    if done.returncode != 0:  # the command's own line, without its `lf-dist: error: ` label
        said = [re.sub(r"^lf-dist: [a-z ]+: ", "", ln) for ln in lines if ln.startswith("lf-dist: ")]
        raise UserError((said or lines or [f"lf-dist export ended with exit code {done.returncode}"])[-1])
    return {"export_dir": str(Path(form["export_dir"]).resolve()), "lines": lines[-5:]}


def run_view(output_dir: str, have: int, last_step: int | None) -> dict:
    out = Path(output_dir).resolve()
    return {
        **runs.run_state(out),
        **records_after(out / "trainer_log.jsonl", have, last_step),
        "lines": log_lines(out),
        "checkpoints": [p.name for p in list_checkpoints(out)] if out.is_dir() else [],  # by step
    }


def chat_form_of_run(output_dir: str) -> dict:
    """The chat fields of a finished run: its base model and template, the run itself as the adapter (LoRA, OFT)
    or as the model (full, freeze)."""
    out = Path(output_dir).resolve()
    try:
        saved = json.loads((out / "lf_dist_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{out} holds no lf-dist run (no lf_dist_config.json)") from None
    adapter = (out / "adapter_config.json").is_file()
    form = {
        "model_name_or_path": saved.get("model_name_or_path") if adapter else str(out),
        "adapter_name_or_path": str(out) if adapter else None,
        "template": saved.get("template"),
        "trust_remote_code": saved.get("trust_remote_code"),
    }
    return {"form": form, "finetuning_type": saved.get("finetuning_type")}


def create_webui_app(root: Path, mode: str = "webui", chat: ChatSlot | None = None):
    """`mode` webui: every page; webchat: the chat page only, its model loaded (`chat`)."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse

    app = FastAPI(title="lf-dist webui", docs_url=None, redoc_url=None, openapi_url=None)
    slot = chat or ChatSlot()
    _add_error_handler(app)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in {p.name for p in STATIC.iterdir()}:
            raise UserError(f"no such file: {name}")
        return FileResponse(STATIC / name)

    @app.get("/api/info")
    async def info():
        from lf_dist import __version__

        return {
            "mode": mode,
            "root": str(root),
            "cwd": str(Path.cwd()),
            "version": __version__,
            "chat": slot.name,
            "sections": forms.SECTIONS,
            "fields": forms.field_kinds(),
        }

    _add_train_routes(app, root)
    _add_chat_routes(app, slot)
    app.mount("/chat", slot)
    return app


def _add_error_handler(app) -> None:
    from fastapi.responses import JSONResponse

    @app.exception_handler(UserError)
    async def _user(request, err: UserError):
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.exception_handler(OSError)
    async def _os(request, err: OSError):
        where = f" {err.filename}" if err.filename else ""
        return JSONResponse({"error": f"cannot use{where}: {err.strerror or err}"}, status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):  # one line on the page, the traceback in the server's log
        logger.exception(f"error while serving {request.url.path}")
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return JSONResponse({"error": f"internal error: {type(err).__name__}: {first}"}, status_code=500)


def _add_train_routes(app, root: Path) -> None:
    from starlette.concurrency import run_in_threadpool

    from lf_dist.webui.datasets import dataset_names, preview
    from lf_dist.webui.planning import command_line, plan_form

    @app.post("/api/config/load")
    async def load(body: PathBody):
        return {"form": forms.from_yaml(Path(body.path).expanduser())}

    @app.post("/api/config/yaml")
    async def as_yaml(body: FormBody):
        out = _output_dir(body.form)
        path = yaml_path(out)
        return {
            "yaml": forms.to_yaml(body.form),
            "path": str(path),
            "command": command_line(str(path), forms.ranks_of(body.form)),
        }

    @app.get("/api/datasets")
    async def datasets(dataset_dir: str):
        return {"datasets": dataset_names(dataset_dir)}

    @app.post("/api/preview")
    async def records(body: FormBody):
        return {"records": await run_in_threadpool(lambda: preview(forms.checked(body.form)))}

    @app.post("/api/plan")
    async def plan(body: FormBody):
        return await run_in_threadpool(plan_form, body.form)

    @app.post("/api/launch")
    async def start(body: FormBody):
        return await run_in_threadpool(launch, body.form)

    @app.get("/api/runs")
    async def listing():
        return {"root": str(root), "runs": await run_in_threadpool(runs.runs_under, root)}

    @app.get("/api/run")
    async def view(output_dir: str, have: int = 0, last_step: int | None = None):
        return await run_in_threadpool(run_view, output_dir, have, last_step)

    @app.post("/api/run/stop")
    async def halt(body: RunBody):
        return runs.stop(Path(body.output_dir).resolve())

    @app.post("/api/run/resume")
    async def again(body: RunBody):
        return await run_in_threadpool(runs.resume, Path(body.output_dir).resolve())

    @app.post("/api/export")
    async def merge(body: FormBody):
        return await run_in_threadpool(export, body.form)


def _add_chat_routes(app, slot: ChatSlot) -> None:
    from starlette.concurrency import run_in_threadpool

    @app.post("/api/chat/load")
    async def load_model(body: FormBody):
        cfg = forms.checked(body.form, "chat")
        return {"model": await run_in_threadpool(slot.load, cfg), "sampling": slot.sampling}

    @app.get("/api/chat/sampling")
    async def sampling():
        return {"model": slot.name, "sampling": slot.sampling}

    @app.get("/api/chat/run")
    async def of_run(output_dir: str):
        return chat_form_of_run(output_dir)


def _sampling(cfg) -> dict:
    g = cfg.generation
    keys = ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty")
    return {key: getattr(g, key) for key in keys}
