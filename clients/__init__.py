"""Clients of the patternflow dataflows: Python (sync and asyncio) and an HTTP gateway."""
