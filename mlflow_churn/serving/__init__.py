"""Serving: online scoring with canary routing, batch scoring, canary analysis."""
