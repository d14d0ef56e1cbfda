"""The controller service: REST API, viewer tokens and the WebSocket proxy to VM desktops, on uvicorn."""
