"""Samplers of diffusion models: ``discrete`` (masked and uniform discrete diffusion, the GADD Gibbs corrector)."""
