"""Research side: datasets, leave-one-out evaluation, federated simulations and the CLI."""
