"""Throwaway real servers (Dovecot, PostgreSQL) for tests, benchmarks and the demo."""
