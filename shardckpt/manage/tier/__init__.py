"""The node-local tier: saves to node-local disks with replicas on other nodes (``local``),
restore with repair from the replicas (``restore``), promotion of a local checkpoint to the
durable root (``promote``), and the checks of local files and their job (``check``)."""
