"""Feature store: versioned definitions, offline frames, online stores, API."""
