"""`lf-dist webui` and `lf-dist webchat`: LlamaBoard's jobs on the API's own web stack (FastAPI + uvicorn).

forms.py (form fields ↔ the CLI's YAML, checked as the CLI checks it), planning.py (the plan for the ranks asked
for), datasets.py (dataset_info.json and a rendered preview), runs.py (launch, state, stop, resume), tail.py
(following trainer_log.jsonl), app.py (the routes), server.py (host, port, start), static/ (the page).
Imported only by these two commands: the `[webui]` extra.
"""
