"""The exchange vocabulary between coordinator and nodes, in one place.

``records``: the Flower records a message carries and their canonical bytes;
``purposes``: what each kind of exchange is for and what it may return; ``hello``: the
job plan a coordinator states before anything else; ``events``: the names of audit-log
events both bindings write and the audit tools read. Nothing here is imported by the
package itself, so the audit core can read ``events`` without loading Flower.
"""
