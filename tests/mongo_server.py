"""A MongoDB wire-protocol test server that the real PyMongo driver talks to.

No mongod can be installed here, so the MongoDB mirror is tested against this: an asyncio
server speaking OP_MSG (with document sequences) and the legacy OP_QUERY/OP_REPLY handshake,
holding documents in memory. It implements what the driver and the mirror use (hello,
insert, update with upsert and operator filters, find, delete, count via aggregate,
endSessions) and answers anything else with "command not found" (code 59). Stopping it
closes every connection and the port; starting it again on the same port keeps the data.
"""

from __future__ import annotations

import asyncio
import datetime
import struct
from collections import defaultdict
from typing import Any

import bson
from bson import ObjectId

OP_REPLY, OP_QUERY, OP_MSG = 1, 2004, 2013
DUPLICATE_KEY = 11000
COMMAND_NOT_FOUND = 59


class MongoTestServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.databases: dict[str, dict[str, dict[Any, dict]]] = defaultdict(lambda: defaultdict(dict))
        self.commands_seen: list[str] = []
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._request_ids = iter(range(1, 1 << 30))

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    def collection(self, database: str, name: str) -> dict[Any, dict]:
        return self.databases[database][name]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the port and drop every connection, as a crashed mongod would."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    # -- wire protocol --------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                header = await reader.readexactly(16)
                length, request_id, _, opcode = struct.unpack("<iiii", header)
                body = await reader.readexactly(length - 16)
                if opcode == OP_MSG:
                    reply = self._op_msg(body)
                    writer.write(self._frame(request_id, OP_MSG, struct.pack("<I", 0) + b"\x00" + bson.encode(reply)))
                elif opcode == OP_QUERY:
                    reply = self._op_query(body)
                    writer.write(
                        self._frame(request_id, OP_REPLY, struct.pack("<iqii", 0, 0, 0, 1) + bson.encode(reply))
                    )
                else:
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()

    def _frame(self, response_to: int, opcode: int, payload: bytes) -> bytes:
        return struct.pack("<iiii", 16 + len(payload), next(self._request_ids), response_to, opcode) + payload

    def _op_msg(self, body: bytes) -> dict:
        (flags,) = struct.unpack_from("<I", body)
        end = len(body) - (4 if flags & 1 else 0)  # checksum present
        position, command = 4, {}
        while position < end:
            kind = body[position]
            position += 1
            if kind == 0:
                (size,) = struct.unpack_from("<i", body, position)
                command.update(bson.decode(body[position : position + size]))
                position += size
            else:  # kind 1: a document sequence, merged into the command under its name
                (size,) = struct.unpack_from("<i", body, position)
                section = body[position + 4 : position + size]
                name, _, documents = section.partition(b"\x00")
                command[name.decode()] = bson.decode_all(documents)
                position += size
        return self._command(command)

    def _op_query(self, body: bytes) -> dict:
        position = 4
        name_end = body.index(b"\x00", position)
        position = name_end + 1 + 8  # collection name, skip, return
        (size,) = struct.unpack_from("<i", body, position)
        return self._command(bson.decode(body[position : position + size]))

    # -- commands -------------------------------------------------------------------------

    def _command(self, command: dict) -> dict:
        name = next(iter(command))
        self.commands_seen.append(name)
        handler = getattr(self, f"_cmd_{name.lower()}", None)
        if handler is None:
            return {
                "ok": 0.0,
                "errmsg": f"no such command: '{name}'",
                "code": COMMAND_NOT_FOUND,
                "codeName": "CommandNotFound",
            }
        try:
            return {**handler(command), "ok": 1.0}
        except Exception as exc:  # a bug here must answer, not hang the driver
            return {"ok": 0.0, "errmsg": f"test server: {exc!r}", "code": 1}

    def _hello(self, _: dict) -> dict:
        return {
            "ismaster": True,
            "isWritablePrimary": True,
            "helloOk": True,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "localTime": datetime.datetime.now(datetime.UTC),
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": 1,
            "minWireVersion": 0,
            "maxWireVersion": 21,
            "readOnly": False,
        }

    _cmd_hello = _cmd_ismaster = _hello

    def _cmd_ping(self, _: dict) -> dict:
        return {}

    def _cmd_buildinfo(self, _: dict) -> dict:
        return {"version": "7.0.0-test", "versionArray": [7, 0, 0, 0]}

    def _cmd_endsessions(self, _: dict) -> dict:
        return {}

    def _cmd_insert(self, command: dict) -> dict:
        documents = self.collection(command["$db"], command["insert"])
        errors = []
        for index, document in enumerate(command.get("documents", [])):
            document.setdefault("_id", ObjectId())
            if document["_id"] in documents:
                errors.append(_duplicate(index, document["_id"]))
                if command.get("ordered", True):
                    break
                continue
            documents[document["_id"]] = document
        return {"n": len(command.get("documents", [])) - len(errors), **({"writeErrors": errors} if errors else {})}

    def _cmd_update(self, command: dict) -> dict:
        documents = self.collection(command["$db"], command["update"])
        matched = modified = 0
        upserted, errors = [], []
        for index, update in enumerate(command.get("updates", [])):
            hits = [doc for doc in documents.values() if matches(doc, update["q"])]
            if not update.get("multi"):
                hits = hits[:1]
            for doc in hits:
                changed = apply_update(doc, update["u"])
                matched += 1
                modified += changed
            if hits or not update.get("upsert"):
                continue
            new = {
                key: value
                for key, value in update["q"].items()
                if not key.startswith("$") and not isinstance(value, dict)
            }
            apply_update(new, update["u"], inserting=True)
            new.setdefault("_id", ObjectId())
            if new["_id"] in documents:
                errors.append(_duplicate(index, new["_id"]))
                if command.get("ordered", True):
                    break
                continue
            documents[new["_id"]] = new
            upserted.append({"index": index, "_id": new["_id"]})
        reply: dict[str, Any] = {"n": matched + len(upserted), "nModified": modified}
        if upserted:
            reply["upserted"] = upserted
        if errors:
            reply["writeErrors"] = errors
        return reply

    def _cmd_find(self, command: dict) -> dict:
        documents = self.collection(command["$db"], command["find"])
        found = [doc for doc in documents.values() if matches(doc, command.get("filter", {}))]
        for key, direction in reversed(list(command.get("sort", {}).items())):
            found.sort(key=lambda doc: _sortable(doc.get(key)), reverse=direction < 0)
        found = found[command.get("skip", 0) :]
        if command.get("limit"):
            found = found[: abs(command["limit"])]
        return {"cursor": {"firstBatch": found, "id": 0, "ns": f"{command['$db']}.{command['find']}"}}

    def _cmd_delete(self, command: dict) -> dict:
        documents = self.collection(command["$db"], command["delete"])
        removed = 0
        for delete in command.get("deletes", []):
            hits = [key for key, doc in documents.items() if matches(doc, delete["q"])]
            for key in hits[:1] if delete.get("limit") == 1 else hits:
                del documents[key]
                removed += 1
        return {"n": removed}

    def _cmd_aggregate(self, command: dict) -> dict:
        """Enough of aggregate for count_documents: $match, $skip, $limit, $group with $sum."""
        documents = list(self.collection(command["$db"], command["aggregate"]).values())
        for stage in command.get("pipeline", []):
            ((operator, argument),) = stage.items()
            if operator == "$match":
                documents = [doc for doc in documents if matches(doc, argument)]
            elif operator == "$skip":
                documents = documents[argument:]
            elif operator == "$limit":
                documents = documents[:argument]
            elif operator == "$group":
                documents = [{"_id": argument["_id"], "n": len(documents)}] if documents else []
            else:
                raise ValueError(f"unsupported stage {operator}")
        return {"cursor": {"firstBatch": documents, "id": 0, "ns": f"{command['$db']}.{command['aggregate']}"}}

    def _cmd_drop(self, command: dict) -> dict:
        self.databases[command["$db"]].pop(command["drop"], None)
        return {}


def _duplicate(index: int, key: Any) -> dict:
    return {"index": index, "code": DUPLICATE_KEY, "errmsg": f"E11000 duplicate key error: _id {key!r}"}


def _sortable(value: Any) -> tuple:
    return (value is not None, value)


def matches(document: dict, query: dict) -> bool:
    for key, condition in query.items():
        if key == "$or":
            if not any(matches(document, branch) for branch in condition):
                return False
        elif key == "$and":
            if not all(matches(document, branch) for branch in condition):
                return False
        elif isinstance(condition, dict) and condition and all(k.startswith("$") for k in condition):
            if not all(_compare(document, key, op, arg) for op, arg in condition.items()):
                return False
        elif document.get(key) != condition:
            return False
    return True


def _compare(document: dict, key: str, operator: str, argument: Any) -> bool:
    present = key in document
    value = document.get(key)
    if operator == "$exists":
        return present == bool(argument)
    if operator == "$eq":
        return value == argument
    if operator == "$ne":
        return value != argument
    if operator == "$in":
        return value in argument
    if value is None or argument is None:
        return False
    return {"$lt": value < argument, "$lte": value <= argument, "$gt": value > argument, "$gte": value >= argument}[
        operator
    ]


def apply_update(document: dict, update: dict, *, inserting: bool = False) -> bool:
    """Apply $set/$setOnInsert/$inc/$unset, or replace the document. Returns True if changed."""
    before = dict(document)
    if not any(key.startswith("$") for key in update):
        kept_id = document.get("_id")
        document.clear()
        document.update(update)
        if kept_id is not None:
            document["_id"] = kept_id
        return document != before
    for operator, fields in update.items():
        if operator == "$set" or (operator == "$setOnInsert" and inserting):
            document.update(fields)
        elif operator == "$inc":
            for key, amount in fields.items():
                document[key] = document.get(key, 0) + amount
        elif operator == "$unset":
            for key in fields:
                document.pop(key, None)
    return document != before


async def _serve_until_stopped() -> None:
    """`python -m tests.mongo_server`: serve on a free port, print the URI, run until killed
    (bench/processes.py MongoProcess runs it in a process of its own)."""
    server = MongoTestServer()
    await server.start()
    print(server.uri, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve_until_stopped())
