"""Default plugins: the operator console (``GET /``) and the read-only routes it draws from
(``/api/v1/audit``, ``/api/v1/stats/series``). See docs/console.md."""
