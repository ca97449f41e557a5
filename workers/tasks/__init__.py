"""Example tasks, one module per dependency: payments, search, email."""
