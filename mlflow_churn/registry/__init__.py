"""Model registry: aliases, the champion/challenger gate, the webhook receiver."""
