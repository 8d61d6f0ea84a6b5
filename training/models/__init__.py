"""Single-file generator/discriminator definitions (nanoGPT style: readable top to bottom, few options)."""
