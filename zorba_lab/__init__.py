"""The quickstart federation: a server and several clients on one machine, measured."""
