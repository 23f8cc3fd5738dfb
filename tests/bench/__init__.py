"""Side-by-side benchmark of the MCP gateway (`make bench`, or `python -m tests.bench`).

Real gunicorn with conf/gunicorn.conf.py in front of real servers
(mcp-server-time over stdio, server-everything over HTTP), measured in one run
against the same servers driven directly, nginx proxy_pass, and peer gateways.
Not a test module: nothing here is collected by pytest.
"""
