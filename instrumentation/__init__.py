"""Write side: capture the usage of every OpenAI call and flush it to the ledger.

Knows nothing of the application's tasks; usable by any Celery app or plain script.
"""
