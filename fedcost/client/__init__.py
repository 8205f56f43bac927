"""The node: what runs at a site (its local work, and its Flower ClientApp binding)."""
