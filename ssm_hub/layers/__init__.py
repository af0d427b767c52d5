"""nn.Modules shared by ssm_hub's models: SSM mixers, norms, and the helpers they need."""
