"""Past one host (issue 20): Ray for membership and supervision, PostgreSQL as the record.

postgres.py         a PostgreSQL 15 owned by browservm in one directory (socket; TCP when asked)
schema.py           the tables (hosts, VMs) and their numbered migrations
placement.py        best of K sampled hosts, as a pure function of their loads
record.py           the operations of fronts and host agents, one transaction each, agents fenced by epoch
routes.py           a front's route cache, invalidated by LISTEN/NOTIFY
token.py            the cluster's one secret, and what is derived from it
agent.py            a host's agent: registers, settles the record against its host, heartbeats
host_controller.py  the host's VMs: the single-host controller, run inside its agent
ray_agent.py        agents as detached Ray actors pinned by node label; fronts' calls to them
ray_node.py         `ray start` for the head, a host's node, a front's; the driver connection
front.py            a front: placement, VMs, hosts, the failure watch
front_app.py        its HTTP API, and the relays of viewers and event streams to hosts
viewer_relay.py     a viewer's WebSocket relayed to its host's proxy, close codes unchanged
front_run.py        running a front in this process
"""
