"""Request ids: MongoDB ObjectIds (from PyMongo's bson) as 24 hex digits, so a request's id is
also its record's `_id` in MongoDB. They sort by creation time; nothing relies on them being
secret."""

from bson import ObjectId


def new_object_id() -> str:
    """A fresh 24-hex id, unique across processes and restarts."""
    return str(ObjectId())
