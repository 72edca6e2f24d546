"""What clients talk to: the websocket gateway, intake, delivery of answers, the HTTP API
and pages, and the wire schemas."""
