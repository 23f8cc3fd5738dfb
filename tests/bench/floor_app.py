"""The stack's floor: a Flask app under the same gunicorn config that answers every POST with a constant.

Issue 6's reference point ("the floor this stack costs before any forwarding"):
what gunicorn gthread + Flask cost per request on this machine, with no MCP work.
Run by the bench as `gunicorn --config conf/gunicorn.conf.py tests.bench.floor_app:app`.
"""

from __future__ import annotations

import json

from flask import Flask, Response, request

app = Flask(__name__)
# The constant result; only the JSON-RPC id is taken from the request, so clients can check it.
RESULT = b'"result":{"content":[{"type":"text","text":"constant"}]}}'


@app.post("/<path:path>")
def constant(path: str) -> Response:
    request_id = json.loads(request.get_data()).get("id")
    return Response(b'{"jsonrpc":"2.0","id":' + json.dumps(request_id).encode() + b"," + RESULT,
                    mimetype="application/json")
