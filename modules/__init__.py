"""LightningModules, one per method, with their losses (``modules.losses``) and networks
(``modules.networks``) kept as pure functions and plain ``nn.Module``s."""
