"""Losses: pure ``nn.Module``s / functions, one file each."""
