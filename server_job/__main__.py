"""``python -m server_job`` runs the same command as ``fedbip-server``."""

from server_job.main import main

main()
