"""Switches that make other libraries use fastvae, one module per library
(``fastvae.integrations.diffusers``). Importing this package imports none of them."""
