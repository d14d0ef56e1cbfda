"""The VM lifecycle: the manager, its records and states, the hops and their probes, the console."""
