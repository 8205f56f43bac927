"""The exchange vocabulary between coordinator and nodes, in one place.

``records``: the Flower records a message carries and their canonical bytes;
``purposes``: what each kind of exchange is for and what it may return; ``hello``: the
job plan a coordinator states before anything else; ``events``: the names of audit-log
events both bindings write and the audit tools read. The package imports none of its
modules, so deployment and the audit core can read it without loading Flower.
"""

# The coordinator's party name: its key in every roster, its audit log's and identity's
# file names, the sender and recipient a node's audit log names.
COORDINATOR = "coordinator"
