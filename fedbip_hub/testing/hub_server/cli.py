"""Run the test Hub by hand: `python -m fedbip_hub.testing.hub_server --port 8765`."""

from __future__ import annotations

import argparse
import sys
import threading

from fedbip_hub.testing.hub_server.access import DEFAULT_ORGS, DEFAULT_TOKEN, DEFAULT_USER
from fedbip_hub.testing.hub_server.server import HubServer


def main(argv: list[str] | None = None) -> int:
    """Run the server in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(description="Local Hugging Face Hub-compatible server")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="admin token to accept")
    parser.add_argument("--user", default=DEFAULT_USER)
    parser.add_argument("--org", action="append", dest="orgs", help="admin's org (repeatable)")
    args = parser.parse_args(argv)
    orgs = tuple(args.orgs) if args.orgs else DEFAULT_ORGS
    server = HubServer(args.port, host=args.host, token=args.token, user=args.user, orgs=orgs)
    server.start()
    print(f"Local Hub listening on {server.endpoint}", flush=True)
    print(f"  export HF_ENDPOINT={server.endpoint} HF_HUB_DISABLE_XET=1", flush=True)
    print(f"  user {args.user!r}, orgs {list(orgs)}: set HF_TOKEN to the --token value", flush=True)
    print("  (default: fedbip_hub.testing.hub_server.DEFAULT_TOKEN)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.stop()
    return 0
