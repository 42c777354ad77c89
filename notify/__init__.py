"""Notifications to people: budget state changes from `burnguard.signals` to webhooks and Slack."""
