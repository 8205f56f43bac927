"""The coordinator: Flower ServerApp, its round loop and what it records."""
