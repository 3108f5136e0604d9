"""Running rounds without a server: scheduled jobs (cron, GitHub Actions, HF Jobs) and
webhooks.
"""
