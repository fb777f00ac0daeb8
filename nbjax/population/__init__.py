"""Populations: many runs that share one program, trained as one vmapped, sharded program."""
