"""The model core: archs, likelihoods and priors as parts (each a registry), assembled in vae.py."""
