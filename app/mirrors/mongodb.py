"""Request records in MongoDB (PyMongo's async API), never moving backwards.

Each outbox row carries one version of a record and its `revision`. A write only applies
if MongoDB holds an older revision (or none): `update_one({_id, revision < r}, $set, upsert)`.
When a newer revision is already there, the filter misses, the upsert collides on `_id`
(duplicate key), and that is the answer "already newer": the row is done. Retention writes a
pruned version the same way; a record past SUMMARY_RETENTION_S comes as DELETED_RECORD and is
deleted.

Records written by release 0.3.0 named the status `status`; the original product, and so every
dashboard, names it `gen_status`. Once per process, before its first write, the mirror gives
such records `gen_status` and `message_type` (their `status` is left in place).
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from bson import ObjectId
from pymongo import AsyncMongoClient, DeleteOne, UpdateOne
from pymongo.errors import BulkWriteError

from app.config import Config
from app.mirrors.outbox import OutboxWorker
from app.storage.outbox_rows import DELETED_RECORD, OutboxItem
from app.storage.store import Store

log = logging.getLogger(__name__)

COLLECTION = "requests"
DUPLICATE_KEY = 11000
_TIME_FIELDS = ("queued_at", "generating_at", "finished_at", "delivered_at", "pruned_at")


def open_client(config: Config) -> AsyncMongoClient:
    """A client that connects lazily: start-up never waits for (or fails on) MongoDB."""
    timeout_ms = int(config.mongodb_timeout_s * 1000)
    return AsyncMongoClient(
        config.mongodb_uri,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        socketTimeoutMS=timeout_ms,
        appname="devoid-generator",
    )


def to_document(record: dict[str, Any]) -> dict[str, Any]:
    document = dict(record)
    for name in _TIME_FIELDS:
        if document.get(name) is not None:
            document[name] = datetime.datetime.fromtimestamp(document[name], datetime.UTC)
    return document


class MongoMirror(OutboxWorker):
    target = "mongodb"

    def __init__(self, store: Store, config: Config, client: AsyncMongoClient) -> None:
        super().__init__(store, config.mirror_retry_max_s)
        self._database = client[config.mongodb_db]
        self._collection = self._database[COLLECTION]
        self._upgraded = False

    async def check(self) -> None:
        await self._database.command("ping")
        await self._upgrade_old_records()

    async def _upgrade_old_records(self) -> None:
        """Give records of release 0.3.0 the original's `gen_status` and `message_type`.
        Safe to run twice: it only touches records that lack `gen_status`."""
        if self._upgraded:
            return
        upgraded = 0
        for status in ("queued", "generating", "ok", "error"):
            outcome = await self._collection.update_many(
                {"gen_status": {"$exists": False}, "status": status},
                {"$set": {"gen_status": status, "message_type": "response"}},
            )
            upgraded += outcome.modified_count
        self._upgraded = True
        if upgraded:
            log.info("mongodb: %d records of an earlier release now carry gen_status", upgraded)

    async def deliver(self, items: list[OutboxItem], done: list[int]) -> None:
        await self._upgrade_old_records()
        # Only the newest version of each record in the batch needs writing.
        newest: dict[str, OutboxItem] = {}
        for item in items:
            if item.object_id not in newest or item.revision > newest[item.object_id].revision:
                newest[item.object_id] = item
        # A record past SUMMARY_RETENTION_S is deleted; one past RETENTION_S gets a version
        # without its payload and result, like the row in SQLite.
        operations: list[UpdateOne | DeleteOne] = [
            DeleteOne({"_id": ObjectId(item.object_id)})
            if item.document == DELETED_RECORD
            else UpdateOne(
                {
                    "_id": ObjectId(item.object_id),
                    "$or": [{"revision": {"$lt": item.revision}}, {"revision": {"$exists": False}}],
                },
                {"$set": to_document(item.document)},
                upsert=True,
            )
            for item in newest.values()
        ]
        try:
            await self._collection.bulk_write(operations, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != DUPLICATE_KEY for error in errors) or exc.details.get("writeConcernErrors"):
                raise
        done.extend(item.id for item in items)
