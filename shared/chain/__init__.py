"""Ethereum side of the pipeline. `devtools` holds the local toolchain (solcjs, Anvil, deploys)
used by the tests, demos and `payments devchain`; it is never imported by the api or workers."""
