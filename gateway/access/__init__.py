"""Access control: API keys, rate limits and quotas, kept in Redis."""
