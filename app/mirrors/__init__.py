"""Mirrors of what SQLite holds: request records in MongoDB, images in S3.

Neither may block the queue or lose anything while it is down: every piece of mirror work is
an outbox row committed with the change it mirrors, drained in order by one worker per
mirror, and deleted only once the mirror has it.
"""
