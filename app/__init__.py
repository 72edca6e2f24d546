"""Devoid Generator: a durable websocket balancer for image-generation backends."""
