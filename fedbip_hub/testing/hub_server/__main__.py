"""`python -m fedbip_hub.testing.hub_server`: serve in the foreground until Ctrl-C."""

from fedbip_hub.testing.hub_server.cli import main

raise SystemExit(main())
