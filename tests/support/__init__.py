"""Helpers the tests share: a real OAuth authorization server, a browser stand-in that approves, an agent client."""
