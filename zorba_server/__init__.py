"""zorba-server: the aggregation server and block-activation scheduler of zorba-edge."""
