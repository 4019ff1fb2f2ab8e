"""The hidden-state cache: the frozen backbone's last-layer states on WebDataset shards (``hawkspec-cache``)."""
