"""Load's pipeline: open the manifest, match the target, plan the reads, fetch (shared by node
where that pays), decode and place; what manage/, cli/, integrations/ and ops/ may use."""

from .pipeline import load, load_full, saved_tree, subtree, tree_for
from .read import ReadPlan, backend_request, read_blob, read_file_chunks
from .share import ShareLostError

__all__ = ["load", "load_full", "saved_tree", "subtree", "tree_for", "ReadPlan",
           "backend_request", "read_blob", "read_file_chunks", "ShareLostError"]
