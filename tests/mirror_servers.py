"""The mirrors' servers for tests: moto's S3 server and the MongoDB wire-protocol test
server (or a real MongoDB when TEST_MONGODB_URI is set), each stoppable and restartable."""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import aioboto3
from moto.server import ThreadedMotoServer
from pymongo import AsyncMongoClient

from tests.mongo_server import MongoTestServer

IMAGE_ENDPOINT = "https://cdn.example.test/images/"
S3_KEYS = {"S3_ACCESS_KEY": "test-access", "S3_SECRET_KEY": "test-secret"}


@dataclass
class S3Server:
    """moto's S3 server on a loopback port. Its objects outlive stop() and start(); moto
    keeps them per process, so each test gets a bucket of its own."""

    port: int
    bucket: str = field(default_factory=lambda: f"devoid-{uuid.uuid4().hex[:12]}")
    server: ThreadedMotoServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "S3_ENDPOINT": self.endpoint,
            "S3_BUCKET_NAME": self.bucket,
            "S3_IMAGE_ENDPOINT": IMAGE_ENDPOINT,
            **S3_KEYS,
        }

    async def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        await asyncio.to_thread(self.server.start)

    async def stop(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
            self.server = None

    def client(self) -> Any:
        return aioboto3.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_KEYS["S3_ACCESS_KEY"],
            aws_secret_access_key=S3_KEYS["S3_SECRET_KEY"],
        )

    async def create_bucket(self) -> None:
        async with self.client() as s3:
            await s3.create_bucket(Bucket=self.bucket)

    async def objects(self) -> dict[str, dict[str, Any]]:
        """key -> {"body", "content_type"} of every object in the bucket."""
        found = {}
        async with self.client() as s3:
            listing = await s3.list_objects_v2(Bucket=self.bucket)
            for item in listing.get("Contents", []):
                response = await s3.get_object(Bucket=self.bucket, Key=item["Key"])
                async with response["Body"] as body:
                    found[item["Key"]] = {"body": await body.read(), "content_type": response["ContentType"]}
        return found


class MongoServer:
    """The wire-protocol test server, or a real MongoDB at TEST_MONGODB_URI (which cannot be
    stopped from a test: outage tests skip there)."""

    def __init__(self, port: int, database: str) -> None:
        self.real_uri = os.environ.get("TEST_MONGODB_URI", "")
        self.database = database
        self.test_server = None if self.real_uri else MongoTestServer(port=port)

    @property
    def stoppable(self) -> bool:
        return self.test_server is not None

    @property
    def uri(self) -> str:
        return self.real_uri or self.test_server.uri

    def env(self) -> dict[str, str]:
        return {"MONGODB_URI": self.uri, "MONGODB_DB": self.database, "MONGODB_TIMEOUT_S": "1"}

    async def start(self) -> None:
        if self.test_server is not None:
            await self.test_server.start()

    async def stop(self) -> None:
        if self.test_server is not None:
            await self.test_server.stop()

    async def records(self) -> dict[str, dict[str, Any]]:
        """object_id -> record, read with the real PyMongo driver."""
        client = AsyncMongoClient(self.uri, serverSelectionTimeoutMS=3000)
        try:
            cursor = client[self.database]["requests"].find({})
            return {str(document["_id"]): document async for document in cursor}
        finally:
            await client.close()

    async def drop(self) -> None:
        client = AsyncMongoClient(self.uri, serverSelectionTimeoutMS=3000)
        try:
            await client[self.database]["requests"].drop()
        finally:
            await client.close()
