"""Training: losses, the LightningModule, configuration and the `cxrlearn train` run."""
