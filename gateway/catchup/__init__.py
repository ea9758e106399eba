"""The catch-up store: what a reconnecting client missed, per branch, written once across instances."""
