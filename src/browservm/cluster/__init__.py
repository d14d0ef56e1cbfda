"""Past one host (issue 20): the cluster's record in PostgreSQL.

postgres.py   a PostgreSQL 15 owned by browservm in one directory, on a Unix socket only
schema.py     the tables (hosts, VMs) and their numbered migrations
placement.py  best of K sampled hosts, as a pure function of their loads
record.py     the operations of fronts and host agents, one transaction each, agents fenced by epoch
routes.py     a front's route cache, invalidated by LISTEN/NOTIFY

Not yet: the Ray agents, the fronts, the viewer relay, the CLI beyond `cluster db-up|db-down DIR`.
"""
